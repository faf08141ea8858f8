"""U-GAT-IT (Kim et al. 2020): generators and discriminators with class-activation-map (CAM)
attention, and AdaLIN in the generators' decoders, trained on unpaired sketches and images
(`training.train_ugatit`). An unpaired baseline of the paper's Table I.

Domains as in CycleGAN (`generation.cyclegan`): 3-channel images in [-1, 1], a sketch as its grey
drawing (`sketch_as_image`).

Generator (the official code's ResnetGenerator): encoder ReflectionPad 3, Conv 7x7 ngf, IN, ReLU;
two Conv 3x3 stride 2 (to 4 ngf), IN, ReLU; `n_blocks` residual blocks (IN). CAM: a bias-free
linear logit on global average and on global max pooling of the features (the auxiliary
classifier "is this the source domain?"); its weights rescale the feature channels, the two
rescaled maps are concatenated and fused by a 1x1 conv + ReLU (the attention map is their
channel sum). An MLP gives AdaLIN's gamma and beta from the attended features: flattened
(the full model; its first layer has (R/4)^2 * 16 ngf^2 weights) or global-average-pooled
(`light`). Decoder: `n_blocks` residual blocks with AdaLIN; two (nearest upsampling x2, Conv 3x3,
LIN, ReLU); ReflectionPad 3, Conv 7x7 to 3 channels, tanh. AdaLIN mixes instance and layer norm
by a learnable rho in [0, 1] (clipped after every update) before the MLP's gamma and beta.

Discriminators (global with `d_layers_global`, local with `d_layers_local`): spectral-normalised
Conv 4x4 stride 2 + LeakyReLU 0.2 (n_layers - 2 of them, doubling the width), one stride-1 Conv
4x4, a CAM as the generator's (spectral-normalised logits on GAP and GMP, 1x1 fuse, LeakyReLU),
and a stride-1 Conv 4x4 to one logit per patch. The official code uses 7 and 5 layers at 256 px
(output 6x6 and 30x30); smaller images drop one stride-2 layer per halving.

    preset  res  ngf/ndf  blocks  light  G / D global + local params (each of two)
    tiny    32   8 / 8    2       yes    0.09M / 0.013M + 0.003M
    cpu     64   16 / 32  4       yes    0.67M / 0.83M + 0.04M
    paper   256  64 / 64  4       no     279.0M / 53.1M + 3.3M  (light: 10.6M)

PyTorch's default initialisation, as the official code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from generation.checkpoints import config_from_dict
from generation.errors import InputError
from generation.registry import NetworkSpec, register
from generation.sketch import sketch_as_image

CHANNELS = 3


@dataclass(frozen=True)
class UGATITConfig:
    resolution: int = 256
    ngf: int = 64
    ndf: int = 64
    n_blocks: int = 4  # residual blocks in the encoder and AdaLIN blocks in the decoder
    light: bool = False  # gamma, beta from pooled features (the official --light True)
    d_layers_global: int = 7
    d_layers_local: int = 5

    def __post_init__(self) -> None:
        if self.resolution not in (32, 64, 128, 256):
            raise InputError(f"resolution {self.resolution}: must be a power of 2 from 32 to 256")
        if min(self.ngf, self.ndf, self.n_blocks) < 1 or min(self.d_layers_global, self.d_layers_local) < 3:
            raise InputError(f"{self}: widths and n_blocks must be positive, discriminators at least 3 layers")
        if self.resolution // 2 ** (self.d_layers_global - 2) - 2 < 1:
            raise InputError(f"d_layers_global {self.d_layers_global} leaves no discriminator output at {self.resolution} px")

    @classmethod
    def from_dict(cls, values: dict) -> UGATITConfig:
        return config_from_dict(cls, values)

    @classmethod
    def at(cls, resolution: int, **changes) -> UGATITConfig:
        """The official discriminator depths (7 and 5 at 256 px), one stride-2 layer less per halving."""
        drop = int(math.log2(256 // resolution))
        return cls(resolution=resolution, d_layers_global=7 - drop, d_layers_local=max(5 - drop, 3), **changes)


PRESETS: dict[str, UGATITConfig] = {
    "tiny": UGATITConfig.at(32, ngf=8, ndf=8, n_blocks=2, light=True),
    # Two CPU cores: the light variant, a quarter of the generator width, half the discriminators';
    # 2.0 s per batch-4 training step on one thread (docs/BENCHMARKS.md).
    "cpu": UGATITConfig.at(64, ngf=16, ndf=32, n_blocks=4, light=True),
    "paper": UGATITConfig.at(256),
}


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), nn.InstanceNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _instance_and_layer(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x normalised per (sample, channel) and per sample; unbiased variances, as the official code."""
    instance = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), keepdim=True) + eps)
    layer = (x - x.mean((1, 2, 3), keepdim=True)) / torch.sqrt(x.var((1, 2, 3), keepdim=True) + eps)
    return instance, layer


class AdaLIN(nn.Module):
    """rho * IN(x) + (1 - rho) * LN(x), scaled and shifted by per-sample gamma, beta (N, C)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), 0.9))

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        instance, layer = _instance_and_layer(x, self.eps)
        mixed = self.rho * instance + (1 - self.rho) * layer
        return mixed * gamma[:, :, None, None] + beta[:, :, None, None]


class LIN(nn.Module):
    """The decoder's upsampling norm: the same mixture with its own learnt gamma and beta."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.rho = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        instance, layer = _instance_and_layer(x, self.eps)
        return (self.rho * instance + (1 - self.rho) * layer) * self.gamma + self.beta


class AdaLINBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.pad1, self.conv1, self.norm1 = nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), AdaLIN(channels)
        self.pad2, self.conv2, self.norm2 = nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=False), AdaLIN(channels)

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(self.pad1(x)), gamma, beta))
        return x + self.norm2(self.conv2(self.pad2(out)), gamma, beta)


def clip_rho(module: nn.Module) -> None:
    """Keep every AdaLIN / LIN rho in [0, 1] (the official RhoClipper, after each generator update)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (AdaLIN, LIN)):
                m.rho.clamp_(0.0, 1.0)


class CAM(nn.Module):
    """Class activation map attention: logits (N, 2) from GAP and GMP, attended features, heatmap (N, 1, h, w)."""

    def __init__(self, channels: int, spectral: bool, activation: nn.Module):
        super().__init__()
        wrap = spectral_norm if spectral else (lambda m: m)
        self.gap_fc = wrap(nn.Linear(channels, 1, bias=False))
        self.gmp_fc = wrap(nn.Linear(channels, 1, bias=False))
        self.fuse = nn.Conv2d(channels * 2, channels, 1)
        self.activation = activation

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gap_logit = self.gap_fc(x.mean((2, 3)))
        gmp_logit = self.gmp_fc(x.amax((2, 3)))
        # the classifiers' weights weigh the channels; under spectral norm the official code takes the
        # raw parameter (weight_orig), the linear's first parameter
        gap = x * next(self.gap_fc.parameters())[0][None, :, None, None]
        gmp = x * next(self.gmp_fc.parameters())[0][None, :, None, None]
        x = self.activation(self.fuse(torch.cat([gap, gmp], 1)))
        return x, torch.cat([gap_logit, gmp_logit], 1), x.sum(1, keepdim=True)


class UGATITGenerator(nn.Module):
    """One direction: (N, 3, R, R) -> (image (N, 3, R, R) in [-1, 1], CAM logits (N, 2), heatmap)."""

    def __init__(self, config: UGATITConfig):
        super().__init__()
        self.config = config
        ngf, width = config.ngf, config.ngf * 4
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(CHANNELS, ngf, 7, bias=False), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, bias=False),
                       nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResidualBlock(width) for _ in range(config.n_blocks)]
        self.encoder = nn.Sequential(*layers)
        self.cam = CAM(width, spectral=False, activation=nn.ReLU(True))
        mlp_in = width if config.light else (config.resolution // 4) ** 2 * width
        self.mlp = nn.Sequential(nn.Linear(mlp_in, width, bias=False), nn.ReLU(True), nn.Linear(width, width, bias=False), nn.ReLU(True))
        self.gamma = nn.Linear(width, width, bias=False)
        self.beta = nn.Linear(width, width, bias=False)
        self.blocks = nn.ModuleList([AdaLINBlock(width) for _ in range(config.n_blocks)])
        up: list[nn.Module] = []
        for mult in (4, 2):
            up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                   nn.Conv2d(ngf * mult, ngf * mult // 2, 3, bias=False), LIN(ngf * mult // 2), nn.ReLU(True)]
        up += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, CHANNELS, 7, bias=False), nn.Tanh()]
        self.decoder = nn.Sequential(*up)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = self.config.resolution
        assert x.ndim == 4 and x.shape[1:] == (CHANNELS, r, r), f"G expects (N, {CHANNELS}, {r}, {r}), got {tuple(x.shape)}"
        x, cam_logit, heatmap = self.cam(self.encoder(x))
        style = self.mlp(x.mean((2, 3)) if self.config.light else x.flatten(1))
        gamma, beta = self.gamma(style), self.beta(style)
        for block in self.blocks:
            x = block(x, gamma, beta)
        return self.decoder(x), cam_logit, heatmap

    def translate(self, sketch: Tensor) -> Tensor:
        """Images (N, 3, R, R) in [-1, 1] from sketches (N, 1, R, R), ink 1 and paper 0 (`sketch_to_tensor`)."""
        return self(sketch_as_image(sketch))[0]


class UGATITDiscriminator(nn.Module):
    """(patch logits (N, 1, P, P), CAM logits (N, 2), heatmap) of one domain's images (N, 3, R, R)."""

    def __init__(self, config: UGATITConfig, n_layers: int):
        super().__init__()
        self.config = config
        ndf = config.ndf
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(CHANNELS, ndf, 4, 2)), nn.LeakyReLU(0.2, True)]
        for i in range(1, n_layers - 2):
            mult = 2 ** (i - 1)
            layers += [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 2)), nn.LeakyReLU(0.2, True)]
        mult = 2 ** (n_layers - 3)
        layers += [nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(ndf * mult, ndf * mult * 2, 4, 1)), nn.LeakyReLU(0.2, True)]
        self.body = nn.Sequential(*layers)
        width = ndf * mult * 2
        self.cam = CAM(width, spectral=True, activation=nn.LeakyReLU(0.2, True))
        self.head = nn.Sequential(nn.ReflectionPad2d(1), spectral_norm(nn.Conv2d(width, 1, 4, 1, bias=False)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r = self.config.resolution
        assert x.ndim == 4 and x.shape[1:] == (CHANNELS, r, r), f"D expects (N, {CHANNELS}, {r}, {r}), got {tuple(x.shape)}"
        x, cam_logit, heatmap = self.cam(self.body(x))
        return self.head(x), cam_logit, heatmap


def configure(preset: str, resolution: int | None = None) -> UGATITConfig:
    """The preset's config, at `resolution` if given (the trainer's cpu preset runs at G's), with
    the discriminator depths of that resolution."""
    if resolution is None:
        return PRESETS[preset]
    kept = {k: v for k, v in asdict(PRESETS[preset]).items() if k not in ("resolution", "d_layers_global", "d_layers_local")}
    return UGATITConfig.at(resolution, **kept)


# The registry entry: BUNDLE/ugatit.safetensors + ugatit.json, the sketch -> image generator.
register(NetworkSpec(name="ugatit", title="U-GAT-IT baseline", config_from_dict=UGATITConfig.from_dict, build=UGATITGenerator,
                     configure=configure, state_key="G", train_command="train ugatit"))
