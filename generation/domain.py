"""The sketch-domain classifier: does a sketch look like a drawing of this archive's anatomy?

A search always returns the nearest archive images, even for a scribble or a drawing of another
organ, and the similarity of the best hit barely tells those apart from sloppy drawings of the
right anatomy: E maps every sketch into the archive's W space, and a few curves lie near some
archive contour whatever they depict. This small CNN looks at the sketch itself and gives one
logit, > 0 for "drawn from this archive's anatomy". `retrieval.quality` turns it into P(in domain),
a factor of every hit's match quality, so a search for a sketch out of the archive's domain says "no close
match". Trained by `training.train_domain` (`python cli.py train domain`).

Input: the canonical sketch as float (N, 1, R, R), ink 1 and paper 0 (`sketch_to_tensor`), R the
bundle's resolution. Blocks: `len(channels)` times Conv 3x3 stride 2 + BatchNorm + LeakyReLU 0.2
(R -> R / 2^len), then the mean and the maximum over positions concatenated (a stroke anywhere
counts, and so does how much of the frame is drawn), then Linear to one logit.

    preset  R    channels                    parameters
    tiny    32   8, 16                       1.3k
    cpu     64   16, 32, 64, 64, 64          98k
    paper   256  16, 32, 64, 128, 128, 128   0.39M

BUNDLE/domain.safetensors is not one of the networks a bundle's id is made of (the search vectors
do not depend on it, so indexes stay valid); the calibration fitted with it records its sha256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from generation.checkpoints import config_from_dict
from generation.errors import InputError
from generation.registry import NetworkSpec, register


@dataclass(frozen=True)
class DomainConfig:
    resolution: int = 64  # the bundle's sketch resolution
    channels: tuple[int, ...] = (16, 32, 64, 64, 64)  # one stride-2 block each

    def __post_init__(self) -> None:
        if not self.channels or self.resolution % 2 ** len(self.channels):
            raise InputError(f"domain classifier: resolution {self.resolution} must be divisible by 2^{len(self.channels)}")

    @classmethod
    def from_dict(cls, values: dict) -> DomainConfig:
        return config_from_dict(cls, {**values, "channels": tuple(values.get("channels", cls.channels))})


PRESETS = {"tiny": DomainConfig(32, (8, 16)), "cpu": DomainConfig(64, (16, 32, 64, 64, 64)),
           "paper": DomainConfig(256, (16, 32, 64, 128, 128, 128))}


class SketchDomainClassifier(nn.Module):
    def __init__(self, config: DomainConfig = DomainConfig()):
        super().__init__()
        self.config = config
        blocks, width = [], 1
        for out in config.channels:
            blocks += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * width, 1)

    def forward(self, sketches: Tensor) -> Tensor:
        """(N, 1, R, R) ink 1 / paper 0 -> (N,) logits, > 0 in the archive's domain."""
        r = self.config.resolution
        assert sketches.ndim == 4 and sketches.shape[1:] == (1, r, r), f"sketches {tuple(sketches.shape)}, expected (N, 1, {r}, {r})"
        features = self.blocks(sketches)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)[:, 0]


def configure(preset: str, resolution: int | None = None) -> DomainConfig:
    """The preset's classifier, at `resolution` (the bundle's) where given."""
    config = PRESETS[preset]
    return config if resolution is None else DomainConfig(resolution, config.channels)


register(NetworkSpec(name="domain", title="sketch-domain classifier", config_from_dict=DomainConfig.from_dict,
                     build=SketchDomainClassifier, configure=configure, state_key="domain", train_command="train domain"))
