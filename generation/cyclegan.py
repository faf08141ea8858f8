"""CycleGAN (Zhu et al. 2017): two ResNet generators and two 70x70 PatchGANs, trained on unpaired
sketches and images (`training.train_cyclegan`). An unpaired baseline of the paper's Table I.

Domains. Both are 3-channel images in [-1, 1], as the reference code reads every picture as RGB:
a sketch is its canonical drawing in grey (paper white +1, ink black -1, `sketch_as_image`), which
makes the identity loss (G(y) ~ y for y already in G's output domain) defined in both directions.

Generator (the reference `resnet_9blocks`): ReflectionPad 3, Conv 7x7 ngf, Norm, ReLU; two Conv 3x3
stride 2 (ngf -> 2 ngf -> 4 ngf), Norm, ReLU; `n_blocks` residual blocks at 4 ngf (ReflectionPad 1,
Conv 3x3, Norm, ReLU, ReflectionPad 1, Conv 3x3, Norm, + input); two ConvTranspose 3x3 stride 2
back up; ReflectionPad 3, Conv 7x7 to 3 channels, tanh. Instance norm without affine parameters
(the reference default), so every conv keeps its bias.

Discriminator (unconditional PatchGAN, the reference `basic`): n_layers Conv 4x4 stride 2 (widths
ndf, 2 ndf, 4 ndf, no norm on the first), one Conv 4x4 stride 1 (8 ndf), Conv 4x4 stride 1 to one
logit per 70x70 patch (n_layers = 3). Weights start N(0, 0.02).

    preset  res  ngf/ndf  blocks  G / D params (each of two)
    tiny    32   8 / 8    2       0.05M / 0.04M
    cpu     64   16 / 32  6       0.49M / 0.69M
    paper   256  64 / 64  9       11.38M / 2.76M
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor, nn

from generation.checkpoints import config_from_dict
from generation.errors import InputError
from generation.registry import NetworkSpec, register
from generation.sketch import sketch_as_image

CHANNELS = 3  # both domains, see the module docstring


@dataclass(frozen=True)
class CycleGANConfig:
    resolution: int = 256
    ngf: int = 64  # generator width after the 7x7 stem
    ndf: int = 64  # discriminator width of its first layer
    n_blocks: int = 9  # residual blocks of each generator (the reference: 9 at 256 px)
    n_layers: int = 3  # PatchGAN stride-2 layers; 3 -> 70x70 receptive field

    def __post_init__(self) -> None:
        if self.resolution not in (32, 64, 128, 256):
            raise InputError(f"resolution {self.resolution}: must be a power of 2 from 32 to 256")
        if min(self.ngf, self.ndf, self.n_blocks, self.n_layers) < 1:
            raise InputError(f"{self}: widths, n_blocks and n_layers must be positive")
        if self.patch_grid < 1:
            raise InputError(f"n_layers {self.n_layers} leaves no discriminator output at {self.resolution} px")

    @property
    def patch_grid(self) -> int:
        """Side of the discriminator's logit grid: stride-2 layers, then two 4x4 pad-1 convs (-1 px each)."""
        return self.resolution // 2**self.n_layers - 2

    @classmethod
    def from_dict(cls, values: dict) -> CycleGANConfig:
        return config_from_dict(cls, values)


PRESETS: dict[str, CycleGANConfig] = {
    "tiny": CycleGANConfig(resolution=32, ngf=8, ndf=8, n_blocks=2),
    # Two CPU cores: a quarter of the reference generator width, half its D width, 6 blocks (the
    # reference's count below 256 px); 1.0 s per batch-4 training step on one thread (docs/BENCHMARKS.md).
    "cpu": CycleGANConfig(resolution=64, ngf=16, ndf=32, n_blocks=6),
    "paper": CycleGANConfig(resolution=256, ngf=64, ndf=64, n_blocks=9),
}


def init_weights(module: nn.Module) -> None:
    """The reference initialisation: conv weights N(0, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """One direction (sketch -> image or image -> sketch): (N, 3, R, R) -> (N, 3, R, R), both in [-1, 1]."""

    def __init__(self, config: CycleGANConfig):
        super().__init__()
        self.config = config
        ngf = config.ngf
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(CHANNELS, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResidualBlock(ngf * 4) for _ in range(config.n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, CHANNELS, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        r = self.config.resolution
        assert x.ndim == 4 and x.shape[1:] == (CHANNELS, r, r), f"G expects (N, {CHANNELS}, {r}, {r}), got {tuple(x.shape)}"
        return self.net(x)

    def translate(self, sketch: Tensor) -> Tensor:
        """Images (N, 3, R, R) in [-1, 1] from sketches (N, 1, R, R), ink 1 and paper 0 (`sketch_to_tensor`)."""
        return self(sketch_as_image(sketch))


class PatchDiscriminator(nn.Module):
    """Patch logits (N, 1, P, P) of one domain's images (N, 3, R, R)."""

    def __init__(self, config: CycleGANConfig):
        super().__init__()
        self.config = config
        ndf = config.ndf
        widths = [ndf * min(2**i, 8) for i in range(config.n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(CHANNELS, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for i in range(1, config.n_layers + 1):
            stride = 2 if i < config.n_layers else 1
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1), nn.InstanceNorm2d(widths[i]), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        r = self.config.resolution
        assert x.ndim == 4 and x.shape[1:] == (CHANNELS, r, r), f"D expects (N, {CHANNELS}, {r}, {r}), got {tuple(x.shape)}"
        return self.net(x)

    def receptive_field(self) -> int:
        size = 1
        for m in reversed(self.net):
            if isinstance(m, nn.Conv2d):
                size = (size - 1) * m.stride[0] + m.kernel_size[0]
        return size


def configure(preset: str, resolution: int | None = None) -> CycleGANConfig:
    """The preset's config, at `resolution` if given (the trainer's cpu preset runs at G's)."""
    return PRESETS[preset] if resolution is None else replace(PRESETS[preset], resolution=resolution)


# The registry entry: BUNDLE/cyclegan.safetensors + cyclegan.json, the sketch -> image generator.
register(NetworkSpec(name="cyclegan", title="CycleGAN baseline", config_from_dict=CycleGANConfig.from_dict,
                     build=ResnetGenerator, configure=configure, state_key="G",
                     train_command="train cyclegan"))
