"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to reals AND fakes before D.

Because the same random transforms hit both distributions and gradients flow through them to G,
D cannot memorise a small training set and G is not taught to produce augmented-looking images.
Policy "color,translation,cutout" is the paper's choice for few-shot data. Images are (N, C, H, W)
in [-1, 1]; every sample draws its own parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from generation.errors import InputError


def _rand(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One uniform [0, 1) number per sample, shaped to broadcast over (C, H, W)."""
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype, generator=generator)


def color(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    x = x + (_rand(x, generator) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, generator) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator) + 0.5) + mean  # contrast


def translation(x: Tensor, ratio: float = 0.125, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by up to ratio * size pixels in x and y, filling with zeros."""
    n, c, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(-sx, sx + 1, (n, 1), device=x.device, generator=generator)
    padded = torch.nn.functional.pad(x, (sx, sx, sy, sy))  # out-of-range reads land on zeros
    rows = (torch.arange(h, device=x.device)[None, :] + dy + sy)[:, None, :, None].expand(n, c, h, w + 2 * sx)
    cols = (torch.arange(w, device=x.device)[None, :] + dx + sx)[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def cutout(x: Tensor, ratio: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Zero a square of ratio * size at a random place (it may be partly outside the image)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1), device=x.device, generator=generator)
    ys = torch.arange(h, device=x.device)[None, :] - cy + ch // 2  # inside when 0 <= ys < ch
    xs = torch.arange(w, device=x.device)[None, :] - cx + cw // 2
    inside_y = (ys >= 0) & (ys < ch)
    inside_x = (xs >= 0) & (xs < cw)
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])  # (N, H, W)
    return x * keep[:, None].to(x.dtype)


AUGMENTS = {"color": color, "translation": translation, "cutout": cutout}


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [p for p in names if p not in AUGMENTS]
    if unknown:
        raise InputError(f"unknown DiffAugment policy {unknown}; choose from {', '.join(AUGMENTS)} (comma-separated) or ''")
    return names


def diff_augment(x: Tensor, policy: str = "color,translation,cutout", generator: torch.Generator | None = None) -> Tensor:
    for name in parse_policy(policy):
        x = AUGMENTS[name](x, generator=generator)
    return x


def random_xflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Data-pipeline mirroring (not DiffAugment): flip half of the images left-right."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)
