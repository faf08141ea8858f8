"""Evaluation metrics used across the project: Fréchet distance and kernel inception distance on
C embeddings (FD-C, KID-C) and DICE.

FD-C is the FID formula applied to the embeddings of the project's own feature network C (MoCo
trained on the archive) instead of Inception-v3 pool features: it is NOT comparable to published FID
numbers, only between methods evaluated with the same C. KID-C is likewise KID (Binkowski et al.
2018) on C's embeddings: unbiased, so it suits the small sample counts of an evaluation split
where FD's covariance estimate is poor.

DICE representation. A segmentation (prediction or reference) is either
  * a label map: integer array (H, W), 0 = background, k = class k; or
  * a list of instances `Instance(class_index, mask, score)` (tuples work too) with a bool (H, W)
    mask; the class-k region is the union of the masks of the class-k instances (score >= min_score).
`dice_per_image` returns (mean, {class: dice}) in percent. The mean is over the classes present in
the prediction or the reference (class 0 excluded); a class present in only one of them scores 0.
When neither has any foreground class the image has no defined DICE: mean is NaN and per-class
is empty, and `dice_summary` leaves such images out (it counts them as `empty`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Union

import numpy as np
import torch

from generation.sketch import Instance

# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((sigma1 sigma2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2) (same spectrum), in float64: stable for
    singular covariances (fewer samples than dimensions), unlike a general matrix square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    root1 = _symmetric_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum())
    difference = mu1 - mu2
    value = float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # tiny negative values are round-off


def gaussian_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fd_c(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """FD-C: Fréchet distance between two sets of C embeddings (N_a, D) and (N_b, D)."""
    mu_a, sigma_a = gaussian_statistics(features_a)
    mu_b, sigma_b = gaussian_statistics(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


# ---------------------------------------------------------------------------------------------
# Kernel distance


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x . y / d + 1)^3 for every pair of rows: (m, d) x (n, d) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of MMD^2 with the polynomial kernel (Gretton et al. 2012, eq. 3):
    the within-set means leave out the diagonal k(x_i, x_i)."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def kid_c(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor, subsets: int = 100,
          subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID-C: (mean, standard deviation) of the unbiased MMD^2 over `subsets` random subsets of
    `subset_size` rows of each set (fewer when a set is smaller), drawn without replacement, as
    Binkowski et al.'s reference code does. Seeded, so a report repeats."""
    a, b = (np.asarray(f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else f, np.float64) for f in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (N, D) features of one D, got shapes {a.shape} and {b.shape}")
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"need at least 2 rows in each set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# ---------------------------------------------------------------------------------------------
# DICE


Segmentation = Union[np.ndarray, torch.Tensor, Sequence[Instance], Sequence[tuple]]


def class_masks(
    segmentation: Segmentation, num_classes: int, shape: tuple[int, int] | None = None, min_score: float = 0.0
) -> np.ndarray:
    """(num_classes, H, W) bool: the region of every class (row 0, background, is unused).

    `shape` is needed only for an empty instance list (nothing else tells the image size).
    """
    if isinstance(segmentation, torch.Tensor):
        segmentation = segmentation.detach().cpu().numpy()
    if isinstance(segmentation, np.ndarray):
        if segmentation.ndim != 2:
            raise ValueError(f"a label map must be (H, W), got shape {segmentation.shape}")
        labels = segmentation.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"label map has classes outside 0..{num_classes - 1}: {sorted(np.unique(labels))}")
        return labels[None] == np.arange(num_classes)[:, None, None]
    instances = [Instance(*item) for item in segmentation]
    if instances:
        shape = instances[0].mask.shape
    if shape is None:
        raise ValueError("an empty instance list needs `shape`")
    masks = np.zeros((num_classes, *shape), dtype=bool)
    for instance in instances:
        if not 0 < instance.class_index < num_classes:
            raise ValueError(f"instance class {instance.class_index} outside 1..{num_classes - 1}")
        if instance.mask.shape != tuple(shape):
            raise ValueError(f"instance mask shape {instance.mask.shape} differs from {tuple(shape)}")
        if instance.score >= min_score:
            masks[instance.class_index] |= np.asarray(instance.mask, dtype=bool)
    return masks


def _shape_of(segmentation: Segmentation) -> tuple[int, int] | None:
    if isinstance(segmentation, (np.ndarray, torch.Tensor)):
        return tuple(segmentation.shape)  # type: ignore[return-value]
    items = list(segmentation)
    return tuple(Instance(*items[0]).mask.shape) if items else None  # type: ignore[return-value]


class DiceResult(NamedTuple):
    mean: float  # percent; NaN when no class is present in either segmentation
    per_class: dict[int, float]  # percent, for every class present in prediction or reference


def dice_per_image(
    prediction: Segmentation, reference: Segmentation, num_classes: int, min_score: float = 0.0
) -> DiceResult:
    """DICE (x100) of one image: 2|P & R| / (|P| + |R|) per class, averaged over the present classes."""
    shape = _shape_of(reference) or _shape_of(prediction)
    if shape is None:
        raise ValueError("both segmentations are empty instance lists: the image size is unknown")
    predicted = class_masks(prediction, num_classes, shape, min_score)
    expected = class_masks(reference, num_classes, shape)
    if predicted.shape != expected.shape:
        raise ValueError(f"prediction {predicted.shape[1:]} and reference {expected.shape[1:]} sizes differ")
    per_class: dict[int, float] = {}
    for index in range(1, num_classes):
        p, r = predicted[index], expected[index]
        total = int(p.sum()) + int(r.sum())
        if total == 0:
            continue  # absent from both: not counted
        per_class[index] = 100.0 * 2.0 * int((p & r).sum()) / total
    mean = float(np.mean(list(per_class.values()))) if per_class else math.nan
    return DiceResult(mean, per_class)


@dataclass
class DiceSummary:
    mean: float  # mean over images of the per-image mean (images with no classes left out)
    per_class: dict[int, float] = field(default_factory=dict)  # mean over images where the class is present
    images: int = 0  # images counted in `mean`
    empty: int = 0  # images with no foreground class in either segmentation

    def to_dict(self, class_names: dict[int, str] | None = None) -> dict[str, object]:
        names = class_names or {}
        return {
            "mean": self.mean,
            "per_class": {names.get(k, str(k)): v for k, v in sorted(self.per_class.items())},
            "images": self.images,
            "empty": self.empty,
        }


def dice_summary(results: Sequence[tuple[float, dict[int, float]]]) -> DiceSummary:
    """Aggregate `dice_per_image` results: mean over images, and per class over the images having it."""
    means = [mean for mean, _ in results if not math.isnan(mean)]
    collected: dict[int, list[float]] = {}
    for _, per_class in results:
        for index, value in per_class.items():
            collected.setdefault(index, []).append(value)
    return DiceSummary(
        mean=float(np.mean(means)) if means else math.nan,
        per_class={k: float(np.mean(v)) for k, v in sorted(collected.items())},
        images=len(means),
        empty=len(results) - len(means),
    )


def dice_matrix(labels_a: np.ndarray, labels_b: np.ndarray, num_classes: int) -> np.ndarray:
    """`dice_per_image(a, b).mean` for every pair of label maps: (A, H, W) x (B, H, W) -> (A, B) percent.

    NaN where neither map of a pair has any foreground class, as `dice_per_image`.
    """
    if labels_a.shape[1:] != labels_b.shape[1:]:
        raise ValueError(f"label maps of {labels_a.shape[1:]} and {labels_b.shape[1:]} pixels cannot be compared")
    sum_dice = np.zeros((len(labels_a), len(labels_b)))
    present = np.zeros((len(labels_a), len(labels_b)), dtype=np.int64)
    for index in range(1, num_classes):
        a = torch.from_numpy((labels_a == index).reshape(len(labels_a), -1).astype(np.float32))
        b = torch.from_numpy((labels_b == index).reshape(len(labels_b), -1).astype(np.float32))
        overlap = (a @ b.T).double().numpy()  # pixel counts, exact in float32 below 2**24 pixels
        total = a.sum(dim=1).double().numpy()[:, None] + b.sum(dim=1).double().numpy()[None, :]
        sum_dice += np.where(total > 0, 200.0 * overlap / np.maximum(total, 1), 0.0)
        present += total > 0
    with np.errstate(invalid="ignore"):
        return np.where(present > 0, sum_dice / np.maximum(present, 1), np.nan)
