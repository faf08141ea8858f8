"""The sketch synthesizer S: SOLOv2 instance segmentation (Wang et al. 2020), in plain torch.

S segments a real image into instances; the contours of the instances it is confident about
(score >= delta = 0.35, as in the paper) drawn on blank paper are the synthesized sketch.

Blocks, named as in the SOLOv2 paper:
- backbone (ResNet) + FPN giving P2..P6; the heads see five levels at strides 8, 8, 16, 32, 32
  (P2 halved, P3, P4, P5, P6 resized to P5);
- per level, the level features resized to an S x S grid feed two shared towers:
  the category branch (sigmoid scores per class and cell, prior 0.01) and the kernel branch
  (CoordConv input, predicts one dynamic 1x1 kernel of length E per cell);
- the unified mask-feature branch: P2..P5 brought to 1/4 scale and summed (coordinates at P5),
  then a 1x1 conv to E channels. The mask of cell k is sigmoid(kernel_k * mask features).
Training: focal loss on categories + Dice loss (weight 3) on the masks of positive cells.
Inference: point NMS on the category map, score threshold, maskness rescoring, Matrix NMS.

Classes: `num_classes` counts foreground classes. Dataset class index k (1..num_classes) is
category channel k - 1; 0 is background and has no channel.

Sizes: the published grids and scale ranges are for ~800 px inputs. Scale ranges (object sizes in
pixels) scale linearly with the input side. The grids keep the published cell counts from 256 px
up and shrink in proportion below 256 px, so a level's grid never samples its stride-8 feature map
more than 1.25x (at 128 px the stride-8 map is 16 px wide; grid 40 would only interpolate it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from generation.checkpoints import config_from_dict
from generation.errors import InputError
from generation.registry import NetworkSpec, load_network, register
from generation.resnet import ResNet, ResNetConfig, make_norm
from generation.sketch import PAPER, Instance, mask_instances, sketch_from_instances

PUBLISHED_SIZE = 800
PUBLISHED_GRIDS = (40, 36, 24, 16, 12)
PUBLISHED_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
LEVEL_STRIDES = (8, 8, 16, 32, 32)
MASK_STRIDE = 4  # the unified mask features are at 1/4 of the input


def level_layout(size: int, grid_scale: float | None = None) -> tuple[tuple[int, ...], tuple[tuple[float, float], ...]]:
    """Grids and scale ranges (sqrt of box area, pixels) for square inputs of `size` pixels."""
    grid_scale = min(1.0, size / 256) if grid_scale is None else grid_scale
    grids = tuple(max(2, round(g * grid_scale)) for g in PUBLISHED_GRIDS)
    scale = size / PUBLISHED_SIZE
    ranges = tuple((round(lo * scale, 2), round(hi * scale, 2)) for lo, hi in PUBLISHED_RANGES)
    return grids, ranges


@dataclass
class SOLOv2Config:
    num_classes: int = 1  # foreground classes (dataset indices 1..num_classes); 0 = background
    size: int = 128  # square input side in pixels, a multiple of 32
    backbone: ResNetConfig = field(default_factory=ResNetConfig)
    fpn_channels: int = 256
    head_channels: int = 512  # category and kernel towers
    stacked_convs: int = 4  # convs per tower
    mask_channels: int = 256  # E: unified mask-feature width = length of each dynamic 1x1 kernel
    mask_branch_channels: int = 128  # inside the mask-feature branch
    grid_scale: float | None = None  # grids = published grids x this; None: min(1, size / 256)
    grids: tuple[int, ...] = ()  # derived from size and grid_scale when empty
    scale_ranges: tuple[tuple[float, float], ...] = ()  # derived from size when empty
    sigma: float = 0.2  # centre region: this fraction of the instance box (around its mass centre)
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    dice_weight: float = 3.0
    score_threshold: float = 0.1  # candidates before Matrix NMS
    mask_threshold: float = 0.5
    update_threshold: float = 0.05  # scores after Matrix NMS decay below this are dropped
    nms_pre: int = 500
    nms_kernel: str = "gaussian"  # "gaussian" | "linear"
    nms_sigma: float = 2.0
    max_instances: int = 100
    sketch_threshold: float = 0.35  # delta: instances drawn in the synthesized sketch / used for DICE

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = ResNetConfig(**self.backbone)
        if self.size < 32 or self.size % 32:
            raise InputError(f"synthesizer size {self.size} must be a multiple of 32 (e.g. 128 or 256)")
        if self.num_classes < 1:
            raise InputError("the synthesizer needs at least one foreground class")
        if self.nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"nms_kernel {self.nms_kernel!r}: use 'gaussian' or 'linear'")
        grids, ranges = level_layout(self.size, self.grid_scale)
        self.grids = tuple(int(g) for g in self.grids) or grids
        self.scale_ranges = tuple((float(lo), float(hi)) for lo, hi in self.scale_ranges) or ranges
        assert len(self.grids) == len(LEVEL_STRIDES) == len(self.scale_ranges)

    @property
    def level_cells(self) -> tuple[int, ...]:
        return tuple(g * g for g in self.grids)

    @property
    def total_cells(self) -> int:
        return sum(self.level_cells)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SOLOv2Config:
        return config_from_dict(cls, values)


def _configure(preset: str, num_classes: int, size: int | None = None) -> SOLOv2Config:
    """S for `num_classes` foreground classes: `tiny` (tests, 64 px), `cpu` (128 px, narrow
    ResNet-18), `paper` (256 px, ResNet-101); `size` overrides the input side."""
    if preset == "tiny":
        return SOLOv2Config(
            num_classes=num_classes, size=size or 64, backbone=ResNetConfig(depth=18, width=8),
            fpn_channels=16, head_channels=16, stacked_convs=1, mask_channels=16, mask_branch_channels=16,
        )
    if preset == "cpu":
        return SOLOv2Config(
            num_classes=num_classes, size=size or 128, backbone=ResNetConfig(depth=18, width=32),
            fpn_channels=64, head_channels=64, stacked_convs=2, mask_channels=64, mask_branch_channels=32,
        )
    # paper: the published SOLOv2 widths; the Sketch2MedI paper used ResNet-101
    return SOLOv2Config(num_classes=num_classes, size=size or 256, backbone=ResNetConfig(depth=101))


# ----------------------------------------------------------------------------------------------
# Blocks


def conv_norm_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        make_norm("group", out_channels),
        nn.ReLU(inplace=True),
    )


def coord_features(x: Tensor) -> Tensor:
    """(N, 2, H, W): x then y, each in [-1, 1] (CoordConv)."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(n, 2, h, w)


class FPN(nn.Module):
    """Feature pyramid: [C2..C5] -> [P2..P6]; P6 is P5 subsampled (no extra convs), as in SOLOv2."""

    def __init__(self, in_channels: Sequence[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        for conv in [*self.lateral, *self.output]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outputs = [conv(f) for conv, f in zip(self.output, laterals)]
        return outputs + [F.max_pool2d(outputs[-1], 1, stride=2)]


class MaskFeatureBranch(nn.Module):
    """Unified mask features at 1/4 scale from P2..P5; coordinates enter at P5 (the coarsest)."""

    def __init__(self, in_channels: int, channels: int, out_channels: int):
        super().__init__()
        self.levels = nn.ModuleList()
        for level in range(4):
            layers: list[nn.Module] = [conv_norm_relu(in_channels + (2 if level == 3 else 0), channels)]
            for step in range(level):
                if step > 0:
                    layers.append(conv_norm_relu(channels, channels))
                layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.levels.append(nn.Sequential(*layers))
        self.project = nn.Sequential(nn.Conv2d(channels, out_channels, 1, bias=False), make_norm("group", out_channels), nn.ReLU(inplace=True))

    def forward(self, features: list[Tensor]) -> Tensor:
        p5 = torch.cat([features[3], coord_features(features[3])], 1)
        summed = sum(branch(f) for branch, f in zip(self.levels, [*features[:3], p5]))
        return self.project(summed)


class SOLOv2Output(NamedTuple):
    categories: list[Tensor]  # per level (N, num_classes, S, S) logits
    kernels: list[Tensor]  # per level (N, E, S, S) dynamic 1x1 kernels
    mask_features: Tensor  # (N, E, H/4, W/4)


class SOLOv2(nn.Module):
    def __init__(self, config: SOLOv2Config):
        super().__init__()
        self.config = config
        self.backbone = ResNet(config.backbone)
        assert config.backbone.maxpool, "SOLOv2 needs C2..C5 at strides 4..32"
        self.fpn = FPN(self.backbone.stage_channels, config.fpn_channels)
        width = config.head_channels
        self.kernel_tower = nn.Sequential(*[conv_norm_relu(config.fpn_channels + 2 if i == 0 else width, width) for i in range(config.stacked_convs)])
        self.category_tower = nn.Sequential(*[conv_norm_relu(config.fpn_channels if i == 0 else width, width) for i in range(config.stacked_convs)])
        self.kernel_out = nn.Conv2d(width, config.mask_channels, 3, padding=1)
        self.category_out = nn.Conv2d(width, config.num_classes, 3, padding=1)
        self.mask_features = MaskFeatureBranch(config.fpn_channels, config.mask_branch_channels, config.mask_channels)
        for module in [self.kernel_tower, self.category_tower, self.kernel_out, self.category_out, self.mask_features]:
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.normal_(conv.weight, std=0.01)
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
        # Focal-loss prior: every cell starts at p = 0.01, so the many background cells do not
        # swamp the first updates.
        nn.init.constant_(self.category_out.bias, -math.log((1 - 0.01) / 0.01))

    @staticmethod
    def normalize(images: Tensor) -> Tensor:
        """uint8-range RGB (N, 3, H, W) -> the project's image convention, float in [-1, 1].

        The same convention as C, so a trunk trained as C can initialise S (`--init-from`).
        """
        return images.float() / 127.5 - 1

    def forward(self, x: Tensor) -> SOLOv2Output:
        """x: normalised images (N, 3, size, size)."""
        size = self.config.size
        assert x.dim() == 4 and x.shape[1:] == (3, size, size), f"SOLOv2 expects (N, 3, {size}, {size}), got {tuple(x.shape)}"
        p = self.fpn(self.backbone(x))
        levels = [
            F.interpolate(p[0], size=p[1].shape[-2:], mode="bilinear", align_corners=False),
            p[1], p[2], p[3],
            F.interpolate(p[4], size=p[3].shape[-2:], mode="bilinear", align_corners=False),
        ]
        categories, kernels = [], []
        for feature, grid in zip(levels, self.config.grids):
            feature = torch.cat([feature, coord_features(feature)], 1)
            feature = F.interpolate(feature, size=(grid, grid), mode="bilinear", align_corners=False)
            kernels.append(self.kernel_out(self.kernel_tower(feature)))
            categories.append(self.category_out(self.category_tower(feature[:, :-2])))  # no coordinates
        mask_features = self.mask_features(p[:4])
        assert mask_features.shape[-1] == size // MASK_STRIDE
        return SOLOv2Output(categories, kernels, mask_features)

    # -- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 16, min_score: float = 0.0,
                mask_size: int | None = None) -> list[list[Instance]]:
        """Instances of each RGB uint8 image (H, W, 3) with score >= `min_score`, sorted by score;
        masks at the image's size, then area-resized to (mask_size, mask_size) if given.

        Each image is resized (not cropped) to the model's square input; masks are resized back.
        """
        images = _check_images(images)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        results: list[list[Instance]] = []
        try:
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                batch = torch.stack([_resize_image(image, self.config.size) for image in chunk]).to(device)
                output = self(self.normalize(batch).contiguous(memory_format=torch.channels_last))
                results += postprocess(output, self.config, [image.shape[:2] for image in chunk], min_score, mask_size)
        finally:
            self.train(was_training)
        return results

    def predict_label_map(self, images: np.ndarray | Sequence[np.ndarray], min_score: float | None = None) -> list[np.ndarray]:
        """Per-pixel class (uint8 (H, W)) from the highest-scoring instance with score >= min_score."""
        min_score = self.config.sketch_threshold if min_score is None else min_score
        return [label_map(instances, image.shape[:2], min_score) for instances, image in zip(self.predict(images), _check_images(images))]

    def synthesize(self, images: np.ndarray | Sequence[np.ndarray], size: int, min_score: float | None = None,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """(sketches, label maps), both uint8 (N, size, size), of square RGB uint8 images.

        Masks are predicted at the image's own size and area-resized to `size` before the contours
        are drawn, so lines have the canonical width at `size` (the generator's resolution).
        """
        min_score = self.config.sketch_threshold if min_score is None else min_score
        images = _check_images(images)
        sketches = np.empty((len(images), size, size), np.uint8)
        labels = np.empty((len(images), size, size), np.uint8)
        for i, instances in enumerate(self.predict(images, batch_size, min_score, mask_size=size)):
            sketches[i] = sketch_of(instances, (size, size), min_score)
            labels[i] = label_map(instances, (size, size), min_score)
        return sketches, labels


def sketch_of(instances: Sequence[Instance], shape: tuple[int, int], min_score: float) -> np.ndarray:
    masks = [i.mask for i in instances if i.score >= min_score and i.mask.any()]
    return sketch_from_instances(masks) if masks else np.full(shape, PAPER, dtype=np.uint8)


def label_map(instances: Sequence[Instance], shape: tuple[int, int], min_score: float) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    for instance in sorted(instances, key=lambda i: i.score):  # highest score painted last, on top
        if instance.score >= min_score:
            out[instance.mask] = instance.class_index
    return out


def _check_images(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    images = list(images)
    for image in images:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            shape = getattr(image, "shape", None)
            raise InputError(f"the synthesizer takes RGB uint8 images (H, W, 3); got {type(image).__name__} {shape}")
        if min(image.shape[:2]) < 8:
            raise InputError(f"image of {image.shape[1]}x{image.shape[0]} pixels is too small to segment")
    return images


def _resize_image(image: np.ndarray, size: int) -> Tensor:
    x = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # a copy: inputs may be read-only
    if x.shape[1:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return x


def _area_resize(masks: Tensor, size: int) -> np.ndarray:
    """Boolean masks (N, H, W) -> (N, size, size): area (box) downscaling or nearest-neighbour
    upscaling, then at least half covered. A whole factor is one average pooling of all the masks,
    which gives exactly PIL's box-filtered pixels; other sizes go through PIL mask by mask."""
    count, height, width = masks.shape
    if (height, width) == (size, size):
        return masks.cpu().numpy()
    factor = height // size
    if height == width and factor > 1 and height == factor * size:
        return (F.avg_pool2d(masks[:, None].float(), factor)[:, 0] >= 0.5).cpu().numpy()
    method = Image.BOX if size < height else Image.NEAREST
    resized = [Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), method) for mask in masks.cpu().numpy()]
    return np.stack([np.asarray(image) >= 128 for image in resized]) if resized else np.zeros((0, size, size), bool)


def points_nms(heat: Tensor) -> Tensor:
    """Keep only cells that are the maximum of their 2x2 neighbourhood (others -> 0)."""
    peak = F.max_pool2d(heat, 2, stride=1, padding=1)[..., :-1, :-1]
    return heat * (peak == heat)


def matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor, kernel: str = "gaussian", sigma: float = 2.0) -> Tensor:
    """Matrix NMS: decayed scores of K candidates sorted by descending score.

    masks (K, H, W) bool/float, labels (K,), scores (K,). Each mask's score decays with its IoU
    with every higher-scoring mask of its class, compensated by how much that higher mask was
    itself suppressed (a suppressed mask should not suppress others).
    """
    k = len(scores)
    if k == 0:
        return scores
    assert masks.shape[0] == labels.shape[0] == k
    assert bool((scores[:-1] >= scores[1:]).all()), "matrix_nms needs scores sorted in descending order"
    return _matrix_nms_batch(masks.reshape(1, k, -1), labels[None], scores[None], kernel, sigma)[0]


def _matrix_nms_batch(masks: Tensor, labels: Tensor, scores: Tensor, kernel: str, sigma: float) -> Tensor:
    """`matrix_nms` of N images at once: masks (N, K, H*W), labels (N, K), scores (N, K), each
    image's candidates sorted by descending score. Padding (all-zero masks, any label, after an
    image's candidates) changes nothing: its IoU with every mask is 0."""
    flat = masks.float()
    areas = flat.sum(2)
    inter = flat @ flat.transpose(1, 2)
    union = areas[:, :, None] + areas[:, None, :] - inter
    iou = (inter / union.clamp(min=1e-6)).triu(diagonal=1)  # iou[n, i, j]: i scores higher than j
    same = (labels[:, :, None] == labels[:, None, :]).float().triu(diagonal=1)
    decay_iou = iou * same
    compensate = decay_iou.max(1).values[:, :, None].expand_as(decay_iou)  # row i: how suppressed i itself is
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (decay_iou**2 - compensate**2))
    else:
        decay = (1 - decay_iou) / (1 - compensate).clamp(min=1e-6)
    return scores * decay.min(1).values


def postprocess(output: SOLOv2Output, config: SOLOv2Config, out_shapes: Sequence[tuple[int, int]], min_score: float = 0.0,
                mask_size: int | None = None) -> list[list[Instance]]:
    """Instances of each image of a batch output with score >= `min_score`, image i's masks resized
    to `out_shapes[i]`, then area-resized to (mask_size, mask_size) if given (`_area_resize`).

    The whole batch goes through each step at once (`_select_instances`, then one resize per group
    of images): per-image calls of many small operations cost more than their arithmetic.
    """
    count = output.mask_features.shape[0]
    assert len(out_shapes) == count, f"{len(out_shapes)} output shapes for a batch of {count}"
    heats = [points_nms(c.sigmoid()) for c in output.categories]
    scores_all = torch.cat([h.flatten(2) for h in heats], 2).transpose(1, 2)  # (N, cells, C)
    kernels_all = torch.cat([k.flatten(2) for k in output.kernels], 2).transpose(1, 2)  # (N, cells, E)
    strides = torch.cat([torch.full((g * g,), s, dtype=torch.float32) for g, s in zip(config.grids, LEVEL_STRIDES)]).to(scores_all.device)
    kept = _select_instances(scores_all, kernels_all, output.mask_features, strides, config, min_score)
    results: list[list[Instance]] = [[] for _ in range(count)]
    for shape, members in _resize_groups(out_shapes, [0 if k is None else len(k[1]) for k in kept], config.size):
        probabilities = torch.cat([kept[i][0] for i in members])
        full = F.interpolate(probabilities[None], size=(config.size, config.size), mode="bilinear", align_corners=False)
        if shape != (config.size, config.size):
            full = F.interpolate(full, size=shape, mode="bilinear", align_corners=False)
        masks = full[0] > config.mask_threshold
        masks = masks.cpu().numpy() if mask_size is None else _area_resize(masks, mask_size)
        first = 0
        for i in members:
            _, scores, classes = kept[i]
            last = first + len(scores)
            results[i] = [Instance(int(c) + 1, m, float(s)) for c, m, s in zip(classes.tolist(), masks[first:last], scores.tolist())]
            first = last
    return results


def _resize_groups(out_shapes: Sequence[tuple[int, int]], counts: Sequence[int], size: int,
                   budget: int = 1 << 24) -> Iterator[tuple[tuple[int, int], list[int]]]:
    """The images with instances, grouped for one resize each: same output shape, and at most
    `budget` resized pixels a group (beyond one image), so large images do not multiply memory."""
    for shape in dict.fromkeys(tuple(shape) for shape in out_shapes):
        group: list[int] = []
        pixels = 0
        for i in (i for i in range(len(counts)) if tuple(out_shapes[i]) == shape and counts[i]):
            cost = counts[i] * max(size * size, shape[0] * shape[1])
            if group and pixels + cost > budget:
                yield shape, group
                group, pixels = [], 0
            group.append(i)
            pixels += cost
        if group:
            yield shape, group


def _select_instances(scores_all: Tensor, kernels: Tensor, features: Tensor, strides: Tensor, config: SOLOv2Config,
                      min_score: float) -> list[tuple[Tensor, Tensor, Tensor] | None]:
    """Each image's instances before resizing: (mask probabilities (K, size/4, size/4), scores (K,),
    classes (K,)) sorted by score, or None if none survives. scores_all (N, cells, C) after the cell
    maxima, kernels (N, cells, E), features (N, E, size/4, size/4).

    The candidates of all images are filtered together, as one flat list ordered by image; each
    image's masks are predicted from its own kernels, and Matrix NMS runs on them padded to the
    largest image's count."""
    count = scores_all.shape[0]
    image, cells, classes = torch.nonzero(scores_all > config.score_threshold, as_tuple=True)
    if len(image) == 0:
        return [None] * count
    scores = scores_all[image, cells, classes]
    per_image = torch.bincount(image, minlength=count).tolist()
    picked = kernels[image, cells].split(per_image)
    probabilities = torch.cat([torch.einsum("ke,ehw->khw", k, f).sigmoid() for k, f in zip(picked, features)])
    binary = probabilities > config.mask_threshold
    areas = binary.flatten(1).sum(1).float()
    # Drop masks smaller than the level's stride (in 1/4-scale pixels), scaled like the ranges.
    keep = areas > strides[cells] * (config.size / PUBLISHED_SIZE)
    if not keep.any():
        return [None] * count
    image, probabilities, binary, areas, scores, classes = image[keep], probabilities[keep], binary[keep], areas[keep], scores[keep], classes[keep]
    maskness = (probabilities * binary).flatten(1).sum(1) / areas
    scores = scores * maskness
    order, rank = _by_image_and_score(image, scores, count, config.nms_pre)
    image, probabilities, binary, scores, classes = image[order], probabilities[order], binary[order], scores[order], classes[order]
    width = int(rank.max()) + 1
    padded_masks = binary.new_zeros((count, width, binary[0].numel()))
    padded_labels = classes.new_full((count, width), -1)
    padded_scores = scores.new_zeros((count, width))
    padded_masks[image, rank], padded_labels[image, rank], padded_scores[image, rank] = binary.flatten(1), classes, scores
    scores = _matrix_nms_batch(padded_masks, padded_labels, padded_scores, config.nms_kernel, config.nms_sigma)[image, rank]
    keep = scores >= max(config.update_threshold, min_score)
    image, probabilities, scores, classes = image[keep], probabilities[keep], scores[keep], classes[keep]
    order, _ = _by_image_and_score(image, scores, count, config.max_instances)
    image, probabilities, scores, classes = image[order], probabilities[order], scores[order], classes[order]
    survivors = torch.bincount(image, minlength=count).tolist()
    return [None if n == 0 else parts for n, parts in
            zip(survivors, zip(probabilities.split(survivors), scores.split(survivors), classes.split(survivors)))]


def _by_image_and_score(image: Tensor, scores: Tensor, count: int, limit: int) -> tuple[Tensor, Tensor]:
    """(order, rank): the candidates ordered by image, then by descending score, at most `limit` an
    image, and each one's place within its image."""
    by_score = scores.argsort(descending=True, stable=True)
    order = by_score[image[by_score].argsort(stable=True)]
    per_image = torch.bincount(image, minlength=count)
    starts = torch.cumsum(per_image, 0) - per_image
    rank = torch.arange(len(order), device=image.device) - starts[image[order]]
    return order[rank < limit], rank[rank < limit]


# ----------------------------------------------------------------------------------------------
# Targets


class Targets(NamedTuple):
    """Training targets of one image over the cells of all levels (flattened level by level)."""

    labels: Tensor  # (cells,) long: dataset class index of each cell, 0 = background
    positive_cells: Tensor  # (P,) long: flat cell indices with an instance
    positive_instance: Tensor  # (P,) long: which row of `masks` each positive cell predicts
    masks: Tensor  # (I, size/4, size/4) float: instance masks at mask-feature scale (area fractions)


def _cell(position: float, size: int, grid: int) -> int:
    """Grid cell (row or column) of a pixel position."""
    return min(grid - 1, max(0, int(position / size * grid)))


def build_targets(mask: np.ndarray, config: SOLOv2Config) -> Targets:
    """Targets from a class-index mask (size, size): instances are its connected components per class.

    An instance goes to every level whose scale range holds sqrt(box area). On a level, its cells
    are the centre cell (holding its mass centre) and the neighbours within the centre region
    (sigma x box around the mass centre), at most 3 x 3.
    """
    size = config.size
    assert mask.shape == (size, size), f"target mask must be ({size}, {size}), got {mask.shape}"
    if mask.max(initial=0) > config.num_classes:
        raise InputError(f"mask has class {int(mask.max())} but the synthesizer has {config.num_classes} classes")
    instances = mask_instances(mask)
    # Larger instances first: a small instance overlapping a large one's centre region then wins
    # the shared cells, since the large one also owns cells on other levels / around its centre.
    instances.sort(key=lambda item: -int(item[1].sum()))
    labels = np.zeros(config.total_cells, dtype=np.int64)
    owner = np.full(config.total_cells, -1, dtype=np.int64)
    boxes = []  # (class, sqrt box area, mass centre y, x, half centre-region h, w) per instance
    for class_index, instance in instances:
        ys, xs = np.nonzero(instance)
        box_h, box_w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        # Mass centre in pixel-edge coordinates (pixel i covers [i, i + 1)).
        boxes.append((class_index, math.sqrt(box_h * box_w), ys.mean() + 0.5, xs.mean() + 0.5, 0.5 * config.sigma * box_h, 0.5 * config.sigma * box_w))
    offset = 0
    for grid, (low, high) in zip(config.grids, config.scale_ranges):
        for index, (class_index, scale, cy, cx, half_h, half_w) in enumerate(boxes):
            if not low <= scale <= high:
                continue
            row, col = _cell(cy, size, grid), _cell(cx, size, grid)
            top, bottom = max(_cell(cy - half_h, size, grid), row - 1), min(_cell(cy + half_h, size, grid), row + 1)
            left, right = max(_cell(cx - half_w, size, grid), col - 1), min(_cell(cx + half_w, size, grid), col + 1)
            cells = (offset + np.arange(top, bottom + 1)[:, None] * grid + np.arange(left, right + 1)[None, :]).ravel()
            labels[cells] = class_index
            owner[cells] = index
        offset += grid * grid
    positive = np.nonzero(owner >= 0)[0]
    stack = np.stack([m for _, m in instances]).astype(np.float32) if instances else np.zeros((0, size, size), np.float32)
    # Area-averaged 1/4-scale targets keep sub-cell boundary information for the Dice loss.
    small = F.avg_pool2d(torch.from_numpy(stack)[:, None], MASK_STRIDE)[:, 0] if len(stack) else torch.zeros(0, size // MASK_STRIDE, size // MASK_STRIDE)
    return Targets(torch.from_numpy(labels), torch.from_numpy(positive), torch.from_numpy(owner[positive]), small)


# ----------------------------------------------------------------------------------------------
# Losses


def focal_loss(logits: Tensor, targets: Tensor, gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """Sigmoid focal loss, summed. logits and 0/1 targets of the same shape."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()


def dice_loss(probabilities: Tensor, targets: Tensor, eps: float = 1e-3) -> Tensor:
    """Per-mask Dice loss 1 - 2 sum(pt) / (sum(p^2) + sum(t^2)), shape (K,) for (K, H, W) inputs."""
    p, t = probabilities.flatten(1), targets.flatten(1)
    return 1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + eps + (t * t).sum(1) + eps)


def solov2_loss(output: SOLOv2Output, targets: Sequence[Targets], config: SOLOv2Config) -> dict[str, Tensor]:
    """{"loss", "loss_mask", "loss_category"}: Dice on positive cells (x3) + focal over all cells."""
    n = output.mask_features.shape[0]
    assert len(targets) == n
    logits = torch.cat([c.flatten(2) for c in output.categories], 2).transpose(1, 2)  # (N, cells, C)
    kernels = torch.cat([k.flatten(2) for k in output.kernels], 2).transpose(1, 2)  # (N, cells, E)
    assert logits.shape[1] == config.total_cells
    device = logits.device
    labels = torch.stack([t.labels for t in targets]).to(device)
    one_hot = F.one_hot(labels, config.num_classes + 1)[..., 1:].to(logits.dtype)  # background has no channel
    num_positive = sum(len(t.positive_cells) for t in targets)
    loss_category = focal_loss(logits, one_hot, config.focal_gamma, config.focal_alpha) / (num_positive + 1)
    predicted, wanted = [], []
    for i, t in enumerate(targets):
        if len(t.positive_cells):
            k = kernels[i, t.positive_cells.to(device)]
            predicted.append(torch.einsum("ke,ehw->khw", k, output.mask_features[i]))
            wanted.append(t.masks.to(device)[t.positive_instance.to(device)])
    if predicted:
        loss_mask = dice_loss(torch.cat(predicted).sigmoid(), torch.cat(wanted)).mean()
    else:  # keep every parameter in the graph (DDP) when a batch has no instance
        loss_mask = kernels.sum() * 0.0 + output.mask_features.sum() * 0.0
    loss_mask = loss_mask * config.dice_weight
    return {"loss": loss_mask + loss_category, "loss_mask": loss_mask.detach(), "loss_category": loss_category.detach()}


# ----------------------------------------------------------------------------------------------
# The registry entry: BUNDLE/synthesizer.safetensors + synthesizer.json

register(NetworkSpec(name="synthesizer", title="synthesizer S", config_from_dict=SOLOv2Config.from_dict, build=SOLOv2,
                     configure=_configure, state_key="model", train_command="train synthesizer"))


# ----------------------------------------------------------------------------------------------
# Files


def sketch_folder(source, out, bundle, size: int = 256, threshold: float = 0.35, device: str = "auto",
                  batch_size: int = 16, on_image=None, on_skip=None) -> int:
    """Segment every image under `source` (file or folder) with the bundle's S and write, per image,
    `out/masks/NAME.png` (class indices; highest-scoring instance on top) and `out/sketches/NAME.png`
    (canonical synthesized sketch of the instances with score >= threshold), both size x size.
    Images are centre-cropped to a square first, as datasets are. An image that cannot be read is
    passed to `on_skip(path, why)` and the others are still done; when none can be, the first one's
    error is raised. Returns the number of images written.
    """
    from pathlib import Path

    from PIL import Image

    from generation.device import pick_device
    from generation.images import find_images, load_rgb, square_resize

    source, out = Path(source), Path(out)
    paths = find_images(source)
    if not paths:
        raise InputError(f"{source}: no images found (PNG, JPEG, TIFF, BMP)")
    model = load_network("synthesizer", bundle, pick_device(device))
    base = source if source.is_dir() else source.parent
    written, failures = 0, []
    for start in range(0, len(paths), batch_size):
        chunk, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(square_resize(load_rgb(path), size))
                chunk.append(path)
            except InputError as error:
                failures.append(error)
                if on_skip is not None:
                    on_skip(path, str(error).removeprefix(f"{path}: "))
        for path, instances in zip(chunk, model.predict(images) if images else []):
            name = path.relative_to(base).with_suffix(".png")
            for folder, array in (("masks", label_map(instances, (size, size), threshold)), ("sketches", sketch_of(instances, (size, size), threshold))):
                target = out / folder / name
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array, mode="L").save(target)
        written += len(chunk)
        if on_image is not None:
            on_image(min(start + batch_size, len(paths)), len(paths))
    if written == 0:
        raise failures[0]
    return written
