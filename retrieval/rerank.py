"""The DICE re-ranking score that search and evaluation share.

Final score of a candidate: lambda * similarity + (1 - lambda) * DICE / 100, with DICE in percent
between S's masks of the generated image and the candidate's stored masks (0 when neither has any
structure); dividing by 100 puts both terms on the same scale.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from retrieval.metrics import dice_per_image


def dice_score(labels: np.ndarray, stored: np.ndarray, classes: int) -> float:
    """Mean per-class DICE (percent) of two uint8 label maps; 0 when neither has any structure.
    `stored` at another resolution is compared at that of `labels`."""
    if stored.shape != labels.shape:
        stored = np.asarray(Image.fromarray(stored).resize(labels.shape[::-1], Image.NEAREST))
    value = dice_per_image(labels, stored, classes).mean
    return 0.0 if np.isnan(value) else value


def rerank_score(similarity, dice, lam: float):
    """lam * similarity + (1 - lam) * dice / 100, for numbers or arrays alike."""
    return lam * similarity + (1 - lam) * dice / 100
