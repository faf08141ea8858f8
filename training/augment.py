"""MoCo v2 "aug+" augmentations as batched torch ops, with per-sample random parameters.

The pipeline is the published one: random resized crop (area 0.2-1, aspect 3/4-4/3), colour jitter
(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) with p 0.8 in a random order per sample,
grayscale with p 0.2, Gaussian blur (sigma 0.1-2 at 224 px) with p 0.5, horizontal flip with p 0.5.
Everything runs on whole batches on the images' device; all random numbers are drawn on the CPU from
one `torch.Generator`, so a batch's views are a pure function of (images, generator state).

Input: uint8 (N, 3, H, W) in [0, 255] or float (N, 3, H, W) in [-1, 1]. Output: float
(N, 3, size, size) in [-1, 1] (the project's image convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as in the usual rgb-to-grayscale


@dataclass
class AugmentConfig:
    size: int = 224  # output side in pixels
    crop_scale: tuple[float, float] = (0.2, 1.0)  # fraction of the image area kept by the crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels at blur_reference_size
    # MoCo's sigma range is for 224-px crops; scaling it keeps the same blur relative to the image.
    blur_reference_size: int = 224
    flip_p: float = 0.5


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_crop_boxes(
    n: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator, attempts: int = 10
) -> Tensor:
    """Random resized crop boxes (x0, y0, w, h) in pixels, (n, 4) float64.

    Same rule as the usual RandomResizedCrop: up to `attempts` tries of (area, aspect) per sample,
    the first that fits wins; otherwise the largest centred crop with a clamped aspect ratio.
    """
    area = height * width
    scale = _uniform(generator, n * attempts, *config.crop_scale).view(n, attempts)
    log_ratio = _uniform(generator, n * attempts, math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
    ratio = torch.exp(log_ratio).view(n, attempts)
    crop_w = torch.sqrt(area * scale * ratio)
    crop_h = torch.sqrt(area * scale / ratio)
    fits = (crop_w <= width) & (crop_h <= height)
    first = torch.argmax(fits.to(torch.int64), dim=1)  # index of the first fitting attempt
    any_fit = fits.any(dim=1)
    rows = torch.arange(n)
    w, h = crop_w[rows, first], crop_h[rows, first]

    # Fallback: centred crop of the whole image with the aspect clamped into the allowed range.
    image_ratio = width / height
    if image_ratio < config.crop_ratio[0]:
        fallback_w, fallback_h = float(width), width / config.crop_ratio[0]
    elif image_ratio > config.crop_ratio[1]:
        fallback_w, fallback_h = height * config.crop_ratio[1], float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    w = torch.where(any_fit, w, torch.full_like(w, fallback_w))
    h = torch.where(any_fit, h, torch.full_like(h, fallback_h))
    position = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    x0 = torch.where(any_fit, position[:, 0] * (width - w), (width - w) / 2)
    y0 = torch.where(any_fit, position[:, 1] * (height - h), (height - h) / 2)
    return torch.stack([x0, y0, w, h], dim=1)


def crop_resize_flip(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Bilinear resampling of each image's box to size x size, mirrored where `flip` is set.

    One `grid_sample` for the whole batch: each box becomes an affine map of the output grid.
    """
    n, _, height, width = images.shape
    x0, y0, w, h = boxes.unbind(dim=1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(images: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = images.unbind(dim=1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    return (images * _per_sample(factor, images)).clamp(0, 1)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    f = _per_sample(factor, images)
    return (f * images + (1 - f) * grayscale(images)).clamp(0, 1)


def rgb_to_hsv(images: Tensor) -> Tensor:
    r, g, b = images.unbind(dim=1)
    maximum, _ = images.max(dim=1)
    minimum, _ = images.min(dim=1)
    delta = maximum - minimum
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    sector = torch.where(maximum == g, (b - r) / safe_delta + 2, (r - g) / safe_delta + 4)
    hue = torch.where(maximum == r, ((g - b) / safe_delta) % 6, sector)
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue)) % 1.0
    safe_maximum = torch.where(maximum > 0, maximum, torch.ones_like(maximum))
    saturation = torch.where(maximum > 0, delta / safe_maximum, torch.zeros_like(maximum))
    return torch.stack([hue, saturation, maximum], dim=1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    hue, saturation, value = hsv.unbind(dim=1)
    # Standard closed form: channel k is v - v*s*clamp(min(t, 4 - t), 0, 1), t = (k + 6h) mod 6.
    channels = []
    for k in (5.0, 3.0, 1.0):
        t = (k + hue * 6) % 6
        channels.append(value - value * saturation * torch.clamp(torch.minimum(t, 4 - t), 0, 1))
    return torch.stack(channels, dim=1)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, 0] + shift.to(device=images.device, dtype=images.dtype).view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma (pixels), reflect padding."""
    n, channels, height, width = images.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    radius = min(radius, height - 1, width - 1)  # reflect padding needs radius < side
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None].to(torch.float64)) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).to(device=images.device, dtype=images.dtype)
    kernels = kernels.repeat_interleave(channels, dim=0)  # one kernel per (sample, channel) group
    flat = images.reshape(1, n * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernels.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, kernels.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


def _to_unit_range(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return ((images.float() + 1) / 2).clamp(0, 1)


def augment_batch(images: Tensor, config: AugmentConfig, generator: torch.Generator) -> Tensor:
    """One MoCo v2 aug+ view of every image: (N, 3, H, W) -> (N, 3, size, size) in [-1, 1]."""
    assert images.dim() == 4 and images.shape[1] == 3, f"expected (N, 3, H, W) images, got {tuple(images.shape)}"
    n, _, height, width = images.shape
    x = _to_unit_range(images)

    # Draw every random number up front, in a fixed order, so the result does not depend on device.
    boxes = sample_crop_boxes(n, height, width, config, generator)
    flip = torch.rand(n, generator=generator) < config.flip_p
    jitter = torch.rand(n, generator=generator) < config.jitter_p
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)  # per-sample jitter order
    brightness = _uniform(generator, n, max(0.0, 1 - config.brightness), 1 + config.brightness)
    contrast = _uniform(generator, n, max(0.0, 1 - config.contrast), 1 + config.contrast)
    saturation = _uniform(generator, n, max(0.0, 1 - config.saturation), 1 + config.saturation)
    hue = _uniform(generator, n, -config.hue, config.hue)
    grey = torch.rand(n, generator=generator) < config.grayscale_p
    blur = torch.rand(n, generator=generator) < config.blur_p
    sigma = _uniform(generator, n, *config.blur_sigma) * (config.size / config.blur_reference_size)

    x = crop_resize_flip(x, boxes, flip, config.size)

    operations = (
        (adjust_brightness, brightness),
        (adjust_contrast, contrast),
        (adjust_saturation, saturation),
        (adjust_hue, hue),
    )
    for position in range(4):
        for op_index, (operation, factors) in enumerate(operations):
            chosen = torch.nonzero(jitter & (order[:, position] == op_index)).flatten()
            if chosen.numel():
                index = chosen.to(x.device)
                x = x.index_copy(0, index, operation(x.index_select(0, index), factors[chosen]))

    chosen = torch.nonzero(grey).flatten()
    if chosen.numel():
        index = chosen.to(x.device)
        x = x.index_copy(0, index, grayscale(x.index_select(0, index)).expand(-1, 3, -1, -1))

    chosen = torch.nonzero(blur).flatten()
    if chosen.numel():
        index = chosen.to(x.device)
        x = x.index_copy(0, index, gaussian_blur(x.index_select(0, index), sigma[chosen]))

    return x * 2 - 1


def resize_images(images: Tensor, size: int) -> Tensor:
    """Plain (centre, no augmentation) view: (N, 3, H, W) uint8 or [-1, 1] float -> [-1, 1] float at size."""
    x = _to_unit_range(images) * 2 - 1
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x
