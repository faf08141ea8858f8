"""H, the refiner: a HyperStyle-style hypernetwork that edits G's weights for one sketch.

At step t, H reads the sketch concatenated with the current image (4 channels) and predicts, for
every refined conv layer of G, a per-sample multiplicative offset Delta_t of the layer's weight:

    theta_t = theta * (1 + sum_{i <= t} Delta_i),   x_t = G(w; theta_t),   x_0 = G(w),

with w = E(sketch) fixed throughout (T = 3 steps in training and inference).

Architecture (HyperStyle, shrunk where the notes in ../shared/REFERENCES.md say CPU presets must):
    trunk: ResNet without max-pool on the 4-channel input (stride 16; ResNet-34 in `paper`)
    per layer: a code head, conv (3x3; 1x1 in the small presets) -> LeakyReLU -> global mean ->
        linear: (N, code_dim)
    per weight shape: one kernel head shared by all layers of that shape, mapping a code to the
        full kernel offset through a rank-r factorisation: Delta[o] = sum_r a_or(code) B_r, with
        B_r learned kernels over (in, k, k). Sharing by shape is HyperStyle's shared hypernetwork;
        the factorisation is what keeps a full-kernel head small.
The shared bases start at zero, so an untrained H leaves G unchanged (x_t = x_0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from generation.errors import InputError
from generation.registry import NetworkSpec, register
from generation.resnet import ResNet, ResNetConfig
from generation.stylegan2 import EqualLinear, FactoredDelta, Generator

LayerShape = tuple[int, int, int, int]


@dataclass(frozen=True)
class RefinerConfig:
    resolution: int = 256
    backbone: ResNetConfig = field(default_factory=lambda: ResNetConfig(depth=34, in_channels=4, width=64, maxpool=False))
    code_dim: int = 512
    code_kernel: int = 3  # the code heads' conv; 1 in the small presets (at 64 px the features are 4 x 4)
    rank: int = 64
    steps: int = 3  # T
    # The refined layers of G and their weight shapes (out, in, k, k); filled from G by `for_generator`.
    layers: tuple[tuple[str, LayerShape], ...] = ()

    def __post_init__(self) -> None:
        if self.backbone.in_channels != 4:
            raise InputError(f"H reads sketch + image (4 channels); backbone.in_channels is {self.backbone.in_channels}")
        if min(self.code_dim, self.rank) < 1 or self.steps < 0:
            raise InputError("code_dim and rank must be positive and steps >= 0")

    @classmethod
    def from_dict(cls, values: dict) -> RefinerConfig:
        values = dict(values)
        values["backbone"] = ResNetConfig(**values["backbone"])
        values["layers"] = tuple((name, tuple(shape)) for name, shape in values["layers"])
        return cls(**values)


def _configure(preset: str, G: Generator, layers: list[str] | None = None) -> RefinerConfig:
    """H for generator G: tiny (tests), cpu (ResNet-18 at width 32, small codes), paper (ResNet-34,
    512-d codes).

    `layers`: names from `G.conv_layers()`; default every non-ToRGB conv (HyperStyle's default).
    """
    presets = {
        "tiny": dict(backbone=ResNetConfig(depth=18, in_channels=4, width=8, maxpool=False), code_dim=16, code_kernel=1, rank=4),
        "cpu": dict(backbone=ResNetConfig(depth=18, in_channels=4, width=32, maxpool=False), code_dim=64, code_kernel=1, rank=16),
        "paper": dict(backbone=ResNetConfig(depth=34, in_channels=4, width=64, maxpool=False), code_dim=512, rank=64),
    }
    available = G.conv_layers()
    chosen = layers if layers is not None else [n for n, info in available.items() if not info.is_torgb]
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise InputError(f"G has no conv layers {unknown}; choose from {', '.join(available)}")
    return RefinerConfig(resolution=G.config.resolution, layers=tuple((n, available[n].shape) for n in chosen), **presets[preset])


def _shape_key(shape: LayerShape) -> str:
    return "o{}_i{}_k{}".format(*shape[:3])


class LayerCode(nn.Module):
    """Trunk features (N, C, h, w) -> one layer's code (N, code_dim)."""

    def __init__(self, channels: int, code_dim: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(channels, code_dim, kernel, padding=kernel // 2)
        self.act = nn.LeakyReLU(0.2)
        self.linear = EqualLinear(code_dim, code_dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.act(self.conv(features)).mean(dim=(2, 3)))


class KernelHead(nn.Module):
    """Code (N, code_dim) -> kernel offset (N, out, in, k, k), rank-r factorised (`FactoredDelta`)."""

    def __init__(self, code_dim: int, shape: LayerShape, rank: int):
        super().__init__()
        self.shape = shape
        out_channels, in_channels, k, _ = shape
        self.rank = rank
        self.coefficients = EqualLinear(code_dim, out_channels * rank)
        self.basis = nn.Parameter(torch.zeros(rank, in_channels * k * k))  # zero: H starts as the identity

    def forward(self, code: Tensor) -> FactoredDelta:
        out_channels, in_channels, k, _ = self.shape
        return FactoredDelta(self.coefficients(code).view(-1, out_channels, self.rank), self.basis, (in_channels, k, k))


class Refiner(nn.Module):
    """H: (sketch (N, 1, R, R), image (N, 3, R, R)) -> {layer name: Delta (N, out, in, k, k), factored}."""

    def __init__(self, config: RefinerConfig):
        super().__init__()
        if not config.layers:
            raise InputError("the refiner config names no G layers; build it with network_config('refiner', preset, G=G)")
        self.config = config
        self.trunk = ResNet(config.backbone)
        channels = self.trunk.out_channels
        self.codes = nn.ModuleDict({name.replace(".", "_"): LayerCode(channels, config.code_dim, config.code_kernel) for name, _ in config.layers})
        shapes = {_shape_key(shape): shape for _, shape in config.layers}
        self.heads = nn.ModuleDict({key: KernelHead(config.code_dim, shape, config.rank) for key, shape in shapes.items()})

    def forward(self, sketches: Tensor, images: Tensor) -> dict[str, FactoredDelta]:
        size = self.config.resolution
        assert sketches.shape[1:] == (1, size, size) and images.shape[1:] == (3, size, size) and len(sketches) == len(images), \
            f"H expects sketches (N, 1, {size}, {size}) and images (N, 3, {size}, {size}), got {tuple(sketches.shape)}, {tuple(images.shape)}"
        features = self.trunk(torch.cat([sketches, images], dim=1))[-1]
        return {name: self.heads[_shape_key(shape)](self.codes[name.replace(".", "_")](features))
                for name, shape in self.config.layers}


def accumulate(total: dict[str, Tensor | FactoredDelta] | None, deltas: dict[str, FactoredDelta]) -> dict[str, Tensor | FactoredDelta]:
    """sum_{i <= t} Delta_i, one step at a time (factored without gradients: `FactoredDelta`)."""
    return dict(deltas) if total is None else {name: total[name] + delta for name, delta in deltas.items()}


def refine(G: Generator, H: Refiner | None, sketches: Tensor, w: Tensor, steps: int,
           on_image: Callable[[int], None] | None = None) -> list[Tensor]:
    """[x_0, x_1, ..., x_T] for codes w (N, w_dim) and sketches (N, 1, R, R).

    `on_image(t)` is called as soon as x_t is made (search times each step with it)."""
    if steps and H is None:
        raise InputError("this bundle has no refiner H; train it (`train refiner`) or use 0 refinement steps")
    made = on_image or (lambda t: None)
    images = [G(w)]
    made(0)
    total = None
    for t in range(1, steps + 1):
        total = accumulate(total, H(sketches, images[-1]))
        images.append(G(w, weight_deltas=total))
        made(t)
    return images


register(NetworkSpec(name="refiner", title="refiner H", config_from_dict=RefinerConfig.from_dict, build=Refiner,
                     configure=_configure, state_key="H", train_command="train refiner"))
