"""pix2pix (Isola et al. 2017): a U-Net generator and a conditional PatchGAN, the baseline that
Sketch2MedI is compared against. Trained on the same (synthesized sketch, image) pairs by
`training.train_pix2pix`.

Tensors: a sketch is float (N, 1, R, R) with ink = 1 and blank paper = 0 (`sketch_to_tensor` makes
it from the canonical uint8 sketch, white 255 paper and black 0 ink); an image is float
(N, 3, R, R) in [-1, 1].

Generator (U-Net): `levels = log2(resolution)` down levels take R px to 1 px. Block `downK` halves
the size (Conv 4x4 stride 2), `upK` mirrors it (ConvTranspose 4x4 stride 2) and receives `downK`'s
output concatenated with `up(K+1)`'s (the skip connection); `upL` (innermost) receives `downL`'s
output alone. width(K) = ngf * min(2^(K-1), max_mult). For the paper's U-Net-256 (ngf 64):

    block   what                                        size        channels in -> out
    down1   Conv (no norm: the paper's first C64)       256 -> 128  1 -> 64
    down2   LReLU 0.2, Conv, Norm                       128 -> 64   64 -> 128
    ...     ...                                         ...         ...
    down8   LReLU, Conv (no norm: 1 px, nothing to normalise over)  2 -> 1   512 -> 512
    up8     ReLU, ConvT, Norm, Dropout 0.5              1 -> 2      512 -> 512
    up7     ReLU, ConvT, Norm, Dropout 0.5              2 -> 4      1024 -> 512
    up6     ReLU, ConvT, Norm, Dropout 0.5              4 -> 8      1024 -> 512
    up5     ReLU, ConvT, Norm                           8 -> 16     1024 -> 512
    ...     ...                                         ...         ...
    up1     ReLU, ConvT, tanh                           128 -> 256  128 -> 3

Dropout sits on the `dropout_levels` innermost decoder blocks (the paper's CD512-CD1024-CD1024).

Discriminator (PatchGAN, conditional): it sees the sketch concatenated with an image (1 + 3
channels) and gives one logit per overlapping patch: n_layers Conv 4x4 stride 2 (widths ndf,
2 ndf, ..., no norm on the first), one Conv 4x4 stride 1, and a Conv 4x4 stride 1 to one channel.
With n_layers = 3 each logit sees a 70x70 patch (`receptive_field()`); a 256 px pair gives 30x30
logits.

Convs feeding a norm have no bias (the norm's shift replaces it). Weights start N(0, 0.02), norm
scales N(1, 0.02), as in the paper.

    preset  res  G widths (down1..)        ngf/ndf  norm   G / D params
    tiny    32   8, 16, 32, 32, 32         8 / 8    batch  0.11M / 0.03M
    cpu     64   32, 64, 128, 256 x3       32 / 32  batch  7.3M / 0.70M
    paper   256  64, 128, 256, 512 x5      64 / 64  batch  54.4M / 2.77M

Test time: the paper keeps dropout on (as noise) and normalises with the test batch's statistics.
We use eval mode instead (no dropout, BatchNorm's running statistics), so a sketch always gives the
same image, independent of what else is in the batch: a deterministic baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from generation.checkpoints import config_from_dict
from generation.errors import InputError
from generation.registry import NetworkSpec, register

Norm = Literal["batch", "instance"]


@dataclass(frozen=True)
class Pix2PixConfig:
    resolution: int = 256
    in_channels: int = 1  # the sketch
    out_channels: int = 3  # the image
    ngf: int = 64  # generator width at the outermost level
    ndf: int = 64  # discriminator width of its first layer
    max_mult: int = 8  # widths stop growing at ngf * max_mult (ndf * max_mult)
    dropout: float = 0.5
    dropout_levels: int = 3  # innermost decoder blocks with dropout
    norm: Norm = "batch"
    n_layers: int = 3  # PatchGAN stride-2 layers; 3 -> 70x70 receptive field

    def __post_init__(self) -> None:
        if self.resolution not in (32, 64, 128, 256):
            raise InputError(f"resolution {self.resolution}: must be a power of 2 from 32 to 256")
        if min(self.in_channels, self.out_channels, self.ngf, self.ndf, self.max_mult, self.n_layers) < 1:
            raise InputError(f"{self}: channel counts, widths and n_layers must be positive")
        if self.norm not in ("batch", "instance"):
            raise InputError(f"norm {self.norm!r}: choose 'batch' or 'instance'")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout {self.dropout}: a probability in [0, 1)")
        if not 0 <= self.dropout_levels < self.levels:
            raise InputError(f"dropout_levels {self.dropout_levels}: must be 0..{self.levels - 1} at {self.resolution} px")
        if self.patch_grid < 1:
            raise InputError(f"n_layers {self.n_layers} leaves no discriminator output at {self.resolution} px")

    @property
    def levels(self) -> int:
        """U-Net down levels: R px down to 1 px."""
        return int(math.log2(self.resolution))

    def width(self, level: int) -> int:
        """Output channels of block `down{level}` (1-based)."""
        return self.ngf * min(2 ** (level - 1), self.max_mult)

    @property
    def patch_grid(self) -> int:
        """Side of the discriminator's logit grid: stride-2 layers, then two 4x4 pad-1 convs (-1 px each)."""
        return self.resolution // 2**self.n_layers - 2

    @classmethod
    def from_dict(cls, values: dict) -> Pix2PixConfig:
        return config_from_dict(cls, values)


PRESETS: dict[str, Pix2PixConfig] = {
    # Unit tests: 32 px, a few thousand parameters per layer.
    "tiny": Pix2PixConfig(resolution=32, ngf=8, ndf=8, max_mult=4),
    # Two CPU cores: 0.3-0.4 s per batch-16 step on one busy thread, so 3000 steps in about 20 minutes.
    "cpu": Pix2PixConfig(resolution=64, ngf=32, ndf=32),
    # The paper's U-Net-256 and 70x70 PatchGAN.
    "paper": Pix2PixConfig(resolution=256, ngf=64, ndf=64),
}


def _norm(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # affine: the learnable scale and shift that BatchNorm has too (the convs before it have no bias)
    return nn.InstanceNorm2d(channels, affine=True)


def init_weights(module: nn.Module) -> None:
    """The paper's initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# Generator.


class UNetGenerator(nn.Module):
    def __init__(self, config: Pix2PixConfig):
        super().__init__()
        self.config = config
        levels = config.levels
        self.blocks = nn.ModuleDict()
        for k in range(1, levels + 1):
            in_ch = config.in_channels if k == 1 else config.width(k - 1)
            layers: list[nn.Module] = [] if k == 1 else [nn.LeakyReLU(0.2)]
            normed = 1 < k < levels
            layers.append(nn.Conv2d(in_ch, config.width(k), 4, stride=2, padding=1, bias=not normed))
            if normed:
                layers.append(_norm(config.norm, config.width(k)))
            self.blocks[f"down{k}"] = nn.Sequential(*layers)
        for k in range(levels, 0, -1):
            in_ch = config.width(k) * (1 if k == levels else 2)  # + the skip from down{k}
            out_ch = config.out_channels if k == 1 else config.width(k - 1)
            layers = [nn.ReLU(), nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=k == 1)]
            if k == 1:
                layers.append(nn.Tanh())
            else:
                layers.append(_norm(config.norm, out_ch))
                if k > levels - config.dropout_levels:
                    layers.append(nn.Dropout(config.dropout))
            self.blocks[f"up{k}"] = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, sketch: Tensor) -> Tensor:
        """Images (N, out_channels, R, R) in [-1, 1] from sketches (N, in_channels, R, R)."""
        c = self.config
        assert sketch.ndim == 4 and sketch.shape[1:] == (c.in_channels, c.resolution, c.resolution), \
            f"G expects (N, {c.in_channels}, {c.resolution}, {c.resolution}), got {tuple(sketch.shape)}"
        skips = []
        x = sketch
        for k in range(1, c.levels + 1):
            x = self.blocks[f"down{k}"](x)
            skips.append(x)
        x = self.blocks[f"up{c.levels}"](skips.pop())
        for k in range(c.levels - 1, 0, -1):
            x = self.blocks[f"up{k}"](torch.cat([x, skips.pop()], dim=1))
        return x

    def translate(self, sketch: Tensor) -> Tensor:
        """The same as calling G: every baseline's sketch -> image translation has this name."""
        return self(sketch)


# --------------------------------------------------------------------------------------------
# Discriminator.


class PatchDiscriminator(nn.Module):
    def __init__(self, config: Pix2PixConfig):
        super().__init__()
        self.config = config
        ndf, mult = config.ndf, config.max_mult
        widths = [ndf * min(2**i, mult) for i in range(config.n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels + config.out_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, config.n_layers + 1):
            stride = 2 if i < config.n_layers else 1  # the last widening layer keeps the size (C512, stride 1)
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1, bias=False), _norm(config.norm, widths[i]),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, sketch: Tensor, image: Tensor) -> Tensor:
        """Patch logits (N, 1, P, P) for a sketch (N, in, R, R) and an image (N, out, R, R)."""
        c = self.config
        assert sketch.shape[1:] == (c.in_channels, c.resolution, c.resolution) and \
            image.shape[1:] == (c.out_channels, c.resolution, c.resolution) and len(sketch) == len(image), \
            f"D expects (N, {c.in_channels}, R, R) and (N, {c.out_channels}, R, R) at R = {c.resolution}, " \
            f"got {tuple(sketch.shape)} and {tuple(image.shape)}"
        return self.net(torch.cat([sketch, image], dim=1))

    def receptive_field(self) -> int:
        """Side in pixels of the input patch that one logit sees."""
        size = 1
        for m in reversed(self.net):
            if isinstance(m, nn.Conv2d):
                size = (size - 1) * m.stride[0] + m.kernel_size[0]
        return size


# --------------------------------------------------------------------------------------------
# The registry entry: BUNDLE/pix2pix.safetensors + pix2pix.json (config and training summary).

register(NetworkSpec(name="pix2pix", title="pix2pix baseline", config_from_dict=Pix2PixConfig.from_dict, build=UNetGenerator,
                     configure=lambda preset: PRESETS[preset], state_key="G", train_command="train pix2pix"))
