"""The sketch-domain classifier: does a sketch look like a drawing of this archive's anatomy?

A search always returns the nearest archive images, even for a scribble or a drawing of another
organ, and the similarity of the best hit barely tells those apart from sloppy drawings of the
right anatomy: E maps every sketch into the archive's W space, and a few curves lie near some
archive contour whatever they depict. This small CNN looks at the sketch itself and gives one
logit, > 0 for "drawn from this archive's anatomy". `retrieval.quality` turns it into P(in domain),
a factor of every hit's match quality, so a search for a sketch out of the archive's domain says "no close
match". Trained by `training.train_domain` (`python cli.py train domain`).

Input: the canonical sketch as float (N, 1, R, R), ink 1 and paper 0 (`sketch_to_tensor`), R the
bundle's resolution. One tower: `len(channels)` times Conv 3x3 stride 2 + BatchNorm + LeakyReLU 0.2
(R -> R / 2^len), then the mean and the maximum over positions concatenated (a stroke anywhere
counts, and so does how much of the frame is drawn), then Linear to one logit. The classifier is
the mean logit of `members` towers, each trained on its own drawings from its own seed: one tower
learns its few thousand drawings by heart, so towers of different seeds refuse different ones of
the sloppiest real drawings, and their mean refuses fewer (docs/RESULTS.md).

    preset  R    channels                    members  parameters
    tiny    32   8, 16                       1        1.3k
    cpu     64   16, 32, 64, 64, 64          3        3 x 98k
    paper   256  16, 32, 64, 128, 128, 128   3        3 x 0.39M

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
    members: int = 1  # towers whose logits are averaged (1 in files written before there were several)

    def __post_init__(self) -> None:
        if not self.channels or self.resolution % 2 ** len(self.channels):
            raise InputError(f"domain classifier: resolution {self.resolution} must be divisible by 2^{len(self.channels)}")
        if self.members < 1:
            raise InputError(f"domain classifier: members {self.members} must be at least 1")

    @classmethod
    def from_dict(cls, values: dict) -> DomainConfig:
        return config_from_dict(cls, {**values, "channels": tuple(values.get("channels", cls.channels))})


PRESETS = {"tiny": DomainConfig(32, (8, 16)), "cpu": DomainConfig(64, (16, 32, 64, 64, 64), members=3),
           "paper": DomainConfig(256, (16, 32, 64, 128, 128, 128), members=3)}


class DomainTower(nn.Module):
    """One member of the classifier: the blocks and the head."""

    def __init__(self, config: DomainConfig):
        super().__init__()
        blocks, width = [], 1
        for out in config.channels:
            blocks += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(2 * width, 1)

    def forward(self, sketches: Tensor) -> Tensor:
        features = self.blocks(sketches)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)[:, 0]


class SketchDomainClassifier(nn.Module):
    def __init__(self, config: DomainConfig = DomainConfig()):
        super().__init__()
        self.config = config
        self.towers = nn.ModuleList(DomainTower(config) for _ in range(config.members))
        self.register_load_state_dict_pre_hook(_one_tower_file)

    def forward(self, sketches: Tensor) -> Tensor:
        """(N, 1, R, R) ink 1 / paper 0 -> (N,) logits, > 0 in the archive's domain: the towers' mean."""
        r = self.config.resolution
        assert sketches.ndim == 4 and sketches.shape[1:] == (1, r, r), f"sketches {tuple(sketches.shape)}, expected (N, 1, {r}, {r})"
        return torch.stack([tower(sketches) for tower in self.towers]).mean(dim=0)


def _one_tower_file(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """Files written before there were several towers name the one tower's weights blocks.* and head.*."""
    for key in [key for key in state if key.startswith((prefix + "blocks.", prefix + "head."))]:
        state[prefix + "towers.0." + key[len(prefix):]] = state.pop(key)


def configure(preset: str, resolution: int | None = None) -> DomainConfig:
    """The preset's classifier, at `resolution` (the bundle's) where given."""
    config = PRESETS[preset]
    return config if resolution is None else DomainConfig(resolution, config.channels, config.members)


register(NetworkSpec(name="domain", title="sketch-domain classifier", config_from_dict=DomainConfig.from_dict,
                     build=SketchDomainClassifier, configure=configure, state_key="domain", train_command="train domain"))
