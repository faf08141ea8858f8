"""ResNet trunks shared by every network of the project (S, E, H and the feature network C).

One plain-torch implementation, parameterised by a small config dataclass, that returns the four
stage outputs [C2, C3, C4, C5]. Parameter names follow the usual ResNet layout (`conv1`, `bn1`,
`layer1.0.conv1`, `layer1.0.downsample.0`, ...), so a trunk trained as C (MoCo) can initialise the
trunks of S, E and H with `load_backbone_weights`, even when their input channel count differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# depth -> (block kind, blocks per stage), as in He et al. 2016.
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


@dataclass
class ResNetConfig:
    depth: int = 18  # 18, 34 (basic blocks), 50, 101 (bottlenecks)
    in_channels: int = 3  # 1 for sketches (E), 4 for sketch + image (H)
    width: int = 64  # stem width; stage widths width * (1, 2, 4, 8), x4 expansion for 50/101
    maxpool: bool = True  # False: no max-pool after the 7x7 stride-2 stem (HyperStyle trunk style)
    norm: str = "batch"  # "batch" | "group" (GroupNorm, for small or per-sample batches)
    zero_init_residual: bool = True  # last norm gamma of each block = 0: blocks start as identities

    def __post_init__(self) -> None:
        if self.depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNet depth {self.depth} not supported; use one of {sorted(RESNET_LAYOUTS)}")
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm {self.norm!r} not supported; use 'batch' or 'group'")
        if self.in_channels < 1 or self.width < 1:
            raise ValueError("in_channels and width must be positive")

    @property
    def expansion(self) -> int:
        return 4 if RESNET_LAYOUTS[self.depth][0] == "bottleneck" else 1

    @property
    def stage_channels(self) -> tuple[int, int, int, int]:
        return tuple(self.width * m * self.expansion for m in (1, 2, 4, 8))  # type: ignore[return-value]


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # 32 groups is the GroupNorm default; narrow trunks (width 16/32) need a divisor of the width.
    return GroupNorm(math.gcd(32, channels), channels)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that normalises a channels-last CPU tensor in the contiguous layout and
    returns it channels-last: PyTorch's CPU kernel for channels-last input is up to 10x slower in
    float32 and 20x in bfloat16 at the sizes of S's heads (docs/BENCHMARKS.md, indexing)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.is_contiguous():
            return super().forward(x)
        out = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
        return out.contiguous(memory_format=torch.channels_last)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, channels, stride, norm)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = make_norm(norm, channels)
        # Stride on the 3x3 conv (the "ResNet v1.5" placement used by common ImageNet/MoCo trunks).
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = make_norm(norm, channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = make_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    @property
    def last_norm(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), make_norm(norm, out_channels))


class ResNet(nn.Module):
    """Stem + four residual stages; `forward` returns [C2, C3, C4, C5].

    With `maxpool=True` the strides are 4, 8, 16, 32; without it 2, 4, 8, 16. There is no pooling
    head and no classifier: callers pool or build FPNs themselves.
    """

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        kind, blocks = RESNET_LAYOUTS[config.depth]
        block_type: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        self.stage_channels: tuple[int, int, int, int] = config.stage_channels

        self.conv1 = nn.Conv2d(config.in_channels, config.width, 7, 2, 3, bias=False)
        self.bn1 = make_norm(config.norm, config.width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if config.maxpool else nn.Identity()

        in_channels = config.width
        stages = []
        for index, count in enumerate(blocks):
            channels = config.width * 2**index
            stride = 1 if index == 0 else 2
            layers = []
            for block_index in range(count):
                layers.append(block_type(in_channels, channels, stride if block_index == 0 else 1, config.norm))
                in_channels = channels * block_type.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # He init (fan_out, ReLU), the standard for ResNets trained from scratch.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.zero_init_residual:
            # Each block starts as the identity, which makes deep trunks train stably from scratch.
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_norm.weight)  # type: ignore[arg-type]

    @property
    def out_channels(self) -> int:
        return self.stage_channels[-1]

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.forward_with_stem(x)[1:]

    def forward_with_stem(self, x: Tensor) -> list[Tensor]:
        """[stem, C2, C3, C4, C5]; stem is the stride-2 ReLU output before the max-pool.

        Perceptual distances use the stem too: it is the only full-detail (stride-2) layer.
        """
        assert x.dim() == 4 and x.shape[1] == self.config.in_channels, (
            f"ResNet expects (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
        )
        stem = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(self.maxpool(stem))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [stem, c2, c3, c4, c5]


def _find_prefix(target_names: set[str], state: dict[str, Tensor]) -> str:
    """Prefix under which `state` holds a trunk (e.g. 'encoder_q.backbone.' in a MoCo state)."""
    if "conv1.weight" in state:
        return ""
    candidates = [key[: -len("conv1.weight")] for key in state if key.endswith("conv1.weight")]
    # The trunk's own stem conv is the candidate whose prefix covers the most target names.
    best, best_hits = "", 0
    for prefix in candidates:
        hits = sum(1 for name in target_names if prefix + name in state)
        if hits > best_hits:
            best, best_hits = prefix, hits
    return best


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Adapt a stem kernel (O, I, k, k) to `in_channels` inputs, keeping the response to flat input.

    A multiple of I channels: tile the kernel (keeps colour selectivity) and rescale by I/in.
    Otherwise: the channel-mean kernel on every input, rescaled by I/in. Either way an input that is
    the same grey image in every channel gives the same activation as it did for the source trunk.
    """
    source = weight.shape[1]
    if source == in_channels:
        return weight.clone()
    if in_channels % source == 0:
        return weight.repeat(1, in_channels // source, 1, 1) * (source / in_channels)
    mean = weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_channels, 1, 1) * (source / in_channels)


def load_backbone_weights(target: ResNet, state: dict[str, Tensor], prefix: str | None = None) -> list[str]:
    """Copy the tensors of `state` whose names and shapes match `target`; return the names loaded.

    `state` may be a bare trunk state or a bigger state holding one under a prefix (found
    automatically unless given). The stem conv is adapted when the input channel count differs
    (e.g. RGB C -> 1-channel sketch encoder E, or 4-channel sketch + image refiner H). Tensors of
    other shapes are skipped, so a narrower or deeper target keeps its own initialisation there.
    """
    own = target.state_dict()
    if prefix is None:
        prefix = _find_prefix(set(own), state)
    loaded: list[str] = []
    updated: dict[str, Tensor] = {}
    for name, tensor in own.items():
        source = state.get(prefix + name)
        if source is None:
            continue
        if name == "conv1.weight" and source.dim() == 4 and source.shape[1] != tensor.shape[1]:
            if source.shape[0] != tensor.shape[0] or source.shape[2:] != tensor.shape[2:]:
                continue
            source = adapt_first_conv(source, tensor.shape[1])
        if source.shape != tensor.shape:
            continue
        updated[name] = source.to(dtype=tensor.dtype)
        loaded.append(name)
    target.load_state_dict(updated, strict=False)
    return loaded
