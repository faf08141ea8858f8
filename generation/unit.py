"""UNIT (Liu et al. 2017): two VAE-GANs, one per domain, with a shared latent space, trained on
unpaired sketches and images (`training.train_unit`). An unpaired baseline of the paper's Table I.

Domains as in CycleGAN (`generation.cyclegan`): 3-channel images in [-1, 1], a sketch as its grey
drawing (`sketch_as_image`).

Generator pair (the official code's VAEGen, with the paper's weight sharing): per domain an encoder
    Conv 7x7 dim, IN, ReLU; `n_downsample` x (Conv 4x4 stride 2, IN, ReLU), doubling the width;
    `n_res - 1` residual blocks (Conv 3x3, IN, ReLU, Conv 3x3, IN; reflection padding throughout)
then ONE residual block shared by both encoders (the high-level layer that ties the domains to one
latent space z); ONE residual block shared by both decoders, then per domain
    `n_res - 1` residual blocks; `n_downsample` x (nearest upsampling x2, Conv 5x5, LayerNorm, ReLU),
    halving the width; Conv 7x7 to 3 channels, tanh.
The encoder gives the mean h of q(z | x); z = h + N(0, I) (unit variance, as the official code),
so the KL term is mean(h^2) / 2 up to a constant; the official loss uses mean(h^2).

Discriminator (the official MsImageDis): at `num_scales` scales (the image, then average-pooled
by 3x3 stride 2 each time) a stack of `d_layers` Conv 4x4 stride 2 (reflection padding) + LeakyReLU 0.2 (no norm,
widths ndf, 2 ndf, ...) and a 1x1 conv to one LSGAN output per location.

    preset  res  dim  n_res  scales  G pair / D params (each of two)
    tiny    32   8    2      2       0.17M / 0.005M
    cpu     64   16   4      3       1.25M / 0.50M
    paper   256  64   4      3       19.9M / 8.27M

Kaiming-normal initialisation of convs (the official `init: kaiming`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generation.checkpoints import config_from_dict
from generation.errors import InputError
from generation.registry import NetworkSpec, register
from generation.sketch import sketch_as_image

CHANNELS = 3
Domain = Literal["sketch", "image"]
DOMAINS: tuple[Domain, Domain] = ("sketch", "image")


@dataclass(frozen=True)
class UNITConfig:
    resolution: int = 256
    dim: int = 64  # encoder width after the 7x7 stem
    n_downsample: int = 2
    n_res: int = 4  # residual blocks per encoder (and decoder), the last (first) of them shared
    ndf: int = 64
    d_layers: int = 4  # stride-2 layers of each scale's discriminator
    num_scales: int = 3

    def __post_init__(self) -> None:
        if self.resolution not in (32, 64, 128, 256):
            raise InputError(f"resolution {self.resolution}: must be a power of 2 from 32 to 256")
        if min(self.dim, self.ndf, self.d_layers, self.num_scales, self.n_downsample) < 1 or self.n_res < 2:
            raise InputError(f"{self}: widths and layer counts must be positive, n_res at least 2 (one shared block)")
        if self.resolution // 2 ** (self.d_layers + self.num_scales - 1) < 1:
            raise InputError(f"{self.num_scales} scales of {self.d_layers} layers leave no discriminator output at {self.resolution} px")

    @property
    def latent_channels(self) -> int:
        return self.dim * 2**self.n_downsample

    @classmethod
    def from_dict(cls, values: dict) -> UNITConfig:
        return config_from_dict(cls, values)


PRESETS: dict[str, UNITConfig] = {
    "tiny": UNITConfig(resolution=32, dim=8, n_res=2, ndf=8, d_layers=2, num_scales=2),
    # Two CPU cores: a quarter of the official generator width; 1.5 s per batch-4 training step on one thread
    # (docs/BENCHMARKS.md).
    "cpu": UNITConfig(resolution=64, dim=16, ndf=32, d_layers=3),
    # The official config (gen dim 64, n_downsample 2, n_res 4; dis dim 64, n_layer 4, num_scales 3).
    "paper": UNITConfig(resolution=256),
}


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LayerNorm(nn.Module):
    """The official code's LayerNorm: per sample over (C, H, W), with a learnable per-channel scale and shift."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.empty(channels).uniform_())
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        mean, std = flat.mean(1).view(-1, 1, 1, 1), flat.std(1).view(-1, 1, 1, 1)
        return (x - mean) / (std + self.eps) * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _encoder(config: UNITConfig) -> nn.Sequential:
    dim = config.dim
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(CHANNELS, dim, 7), nn.InstanceNorm2d(dim), nn.ReLU(True)]
    for _ in range(config.n_downsample):
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim * 2, 4, 2), nn.InstanceNorm2d(dim * 2), nn.ReLU(True)]
        dim *= 2
    layers += [ResidualBlock(dim) for _ in range(config.n_res - 1)]
    return nn.Sequential(*layers)


def _decoder(config: UNITConfig) -> nn.Sequential:
    dim = config.latent_channels
    layers: list[nn.Module] = [ResidualBlock(dim) for _ in range(config.n_res - 1)]
    for _ in range(config.n_downsample):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(2), nn.Conv2d(dim, dim // 2, 5),
                   LayerNorm(dim // 2), nn.ReLU(True)]
        dim //= 2
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(dim, CHANNELS, 7), nn.Tanh()]
    return nn.Sequential(*layers)


class UNITGenerator(nn.Module):
    """Both domains' encoders and decoders around the shared latent layers."""

    def __init__(self, config: UNITConfig):
        super().__init__()
        self.config = config
        self.encoders = nn.ModuleDict({d: _encoder(config) for d in DOMAINS})
        self.shared_encoder = ResidualBlock(config.latent_channels)
        self.shared_decoder = ResidualBlock(config.latent_channels)
        self.decoders = nn.ModuleDict({d: _decoder(config) for d in DOMAINS})
        init_weights(self)

    def encode(self, x: Tensor, domain: Domain) -> Tensor:
        """The mean h of q(z | x): (N, latent_channels, R / 2^n_downsample, same)."""
        r = self.config.resolution
        assert x.ndim == 4 and x.shape[1:] == (CHANNELS, r, r), f"UNIT expects (N, {CHANNELS}, {r}, {r}), got {tuple(x.shape)}"
        return self.shared_encoder(self.encoders[domain](x))

    def decode(self, z: Tensor, domain: Domain) -> Tensor:
        """Images (N, 3, R, R) in [-1, 1] of `domain` from latent codes z."""
        return self.decoders[domain](self.shared_decoder(z))

    def forward(self, x: Tensor, source: Domain = "sketch", target: Domain = "image") -> Tensor:
        """x of `source` translated to `target` through the mean code (no sampling noise)."""
        return self.decode(self.encode(x, source), target)

    def translate(self, sketch: Tensor) -> Tensor:
        """Images (N, 3, R, R) in [-1, 1] from sketches (N, 1, R, R), ink 1 and paper 0 (`sketch_to_tensor`)."""
        return self(sketch_as_image(sketch))


class MultiScaleDiscriminator(nn.Module):
    """Per scale, LSGAN outputs (N, 1, h, w) of one domain's images (N, 3, R, R); a list, finest first."""

    def __init__(self, config: UNITConfig):
        super().__init__()
        self.config = config
        self.scales = nn.ModuleList()
        for _ in range(config.num_scales):
            dim, layers = config.ndf, [nn.ReflectionPad2d(1), nn.Conv2d(CHANNELS, config.ndf, 4, 2), nn.LeakyReLU(0.2, True)]
            for _ in range(config.d_layers - 1):
                layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim * 2, 4, 2), nn.LeakyReLU(0.2, True)]
                dim *= 2
            layers.append(nn.Conv2d(dim, 1, 1))
            self.scales.append(nn.Sequential(*layers))
        init_weights(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        r = self.config.resolution
        assert x.ndim == 4 and x.shape[1:] == (CHANNELS, r, r), f"D expects (N, {CHANNELS}, {r}, {r}), got {tuple(x.shape)}"
        outputs = []
        for scale in self.scales:
            outputs.append(scale(x))
            x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
        return outputs


def configure(preset: str, resolution: int | None = None) -> UNITConfig:
    """The preset's config, at `resolution` if given (the trainer's cpu preset runs at G's)."""
    return PRESETS[preset] if resolution is None else replace(PRESETS[preset], resolution=resolution)


# The registry entry: BUNDLE/unit.safetensors + unit.json, both domains' VAEs (translation needs
# one domain's encoder and the other's decoder, and the shared layers between).
register(NetworkSpec(name="unit", title="UNIT baseline", config_from_dict=UNITConfig.from_dict, build=UNITGenerator,
                     configure=configure, state_key="G", train_command="train unit"))
