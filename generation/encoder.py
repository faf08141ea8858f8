"""E, the sketch encoder (e4e's single-W encoder), and the latent discriminator of phase 1.

E: canonical sketch (N, 1, R, R), ink 1 on paper 0 -> ResNet trunk -> global average pool ->
equalised linear -> offset; w = w_avg + offset, one w in W for every style input of G. The output
layer starts at zero, so an untrained E returns G's average image rather than noise.

The latent discriminator (e4e): 3 x (Linear w -> w, LeakyReLU 0.2) + Linear w -> 1. It tells E's
codes from w = mapping(z), which keeps E's codes inside the region of W that G was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from generation.errors import InputError
from generation.registry import NetworkSpec, register
from generation.resnet import ResNet, ResNetConfig
from generation.stylegan2 import EqualLinear


@dataclass(frozen=True)
class EncoderConfig:
    resolution: int = 256  # sketch side; the generator's resolution
    w_dim: int = 512
    backbone: ResNetConfig = field(default_factory=lambda: ResNetConfig(depth=50, in_channels=1, width=64))
    discriminator_layers: int = 4  # the latent discriminator's depth (linear layers)

    def __post_init__(self) -> None:
        if self.backbone.in_channels != 1:
            raise InputError(f"E reads 1-channel sketches; backbone.in_channels is {self.backbone.in_channels}")
        if self.discriminator_layers < 2:
            raise InputError("the latent discriminator needs at least 2 layers")

    @classmethod
    def from_dict(cls, values: dict) -> EncoderConfig:
        values = dict(values)
        values["backbone"] = ResNetConfig(**values["backbone"])
        return cls(**values)


def _configure(preset: str, resolution: int, w_dim: int) -> EncoderConfig:
    """E for a generator of `resolution` and `w_dim`: tiny (tests), cpu (ResNet-18 at width 32),
    paper (ResNet-50, as in the paper)."""
    backbones = {
        "tiny": ResNetConfig(depth=18, in_channels=1, width=8),
        "cpu": ResNetConfig(depth=18, in_channels=1, width=32),
        "paper": ResNetConfig(depth=50, in_channels=1, width=64),
    }
    return EncoderConfig(resolution=resolution, w_dim=w_dim, backbone=backbones[preset])


class SketchEncoder(nn.Module):
    """E: sketches (N, 1, R, R) -> w (N, w_dim) = w_avg + predicted offset."""

    def __init__(self, config: EncoderConfig, w_avg: Tensor | None = None):
        super().__init__()
        self.config = config
        self.backbone = ResNet(config.backbone)
        self.to_w = EqualLinear(self.backbone.out_channels, config.w_dim)
        nn.init.zeros_(self.to_w.weight)
        self.register_buffer("w_avg", torch.zeros(config.w_dim) if w_avg is None else w_avg.detach().clone().float())
        assert self.w_avg.shape == (config.w_dim,), f"w_avg {tuple(self.w_avg.shape)} for w_dim {config.w_dim}"
        # The mean code of the training sketches, set when training ends: retrieval compares codes
        # as offsets from it, which removes the component every code shares.
        self.register_buffer("code_mean", self.w_avg.clone())

    def forward(self, sketches: Tensor) -> Tensor:
        size = self.config.resolution
        assert sketches.ndim == 4 and sketches.shape[1:] == (1, size, size), \
            f"E expects sketches (N, 1, {size}, {size}), got {tuple(sketches.shape)}"
        pooled = self.backbone(sketches)[-1].mean(dim=(2, 3))
        return self.w_avg + self.to_w(pooled)


class LatentDiscriminator(nn.Module):
    """(N, w_dim) codes -> (N,) logits: real (mapping(z)) vs encoded."""

    def __init__(self, w_dim: int, layers: int = 4):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(layers - 1):
            blocks += [nn.Linear(w_dim, w_dim), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*blocks, nn.Linear(w_dim, 1))

    def forward(self, w: Tensor) -> Tensor:
        return self.net(w).squeeze(1)


register(NetworkSpec(name="encoder", title="sketch encoder E", config_from_dict=EncoderConfig.from_dict, build=SketchEncoder,
                     configure=_configure, state_key="E", train_command="train encoder"))
