"""Matching a labelled sketch per class: a re-ranking stage for strokes that carry a class.

The vector search is the same as for a plain sketch (the FAISS vector has no classes, so nothing is
re-indexed); the candidates it returns are then re-scored per class the user drew. For each drawn
class c, against a candidate's stored S masks:

    field_c = cos(f(the strokes of class c), f(the contours of class c in the candidate's masks))
    dice_c  = DICE of class c alone between S(x_hat) and the candidate's masks (percent)

with f the sketch field of `retrieval.vector` (a soft chamfer match: class c's lines against class
c's outlines only, so a fold drawn where the candidate has its glottis no longer counts as a match).
The class match and the final score are

    match = mean over the drawn classes of (1 - g) field_c + g dice_c / 100
    score = (1 - weight) score + weight match

`LabelWeights` holds weight and g (chosen on validation, docs/RESULTS.md). A candidate without
class c gets 0 for it. Unlabelled strokes count only in the plain vector and score, as today; a
sketch with no labelled stroke keeps its plain ranking exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from generation.errors import InputError
from generation.labelled import LabelledSketch
from generation.sketch import PAPER, sketch_from_mask
from retrieval.vector import sketch_field


@dataclass(frozen=True)
class LabelWeights:
    """weight: share of the class match in the final score; dice: share of per-class DICE (g) in the match."""

    weight: float = 0.5
    dice: float = 0.0

    def __post_init__(self) -> None:
        for name, value in (("weight", self.weight), ("dice", self.dice)):
            if not 0 <= value <= 1:  # also refuses NaN
                raise InputError(f"label {name} {value}: must be between 0 and 1")

    @property
    def tag(self) -> str:
        return f"weight={self.weight:g},dice={self.dice:g}"


def parse_label_weights(text: str) -> tuple[LabelWeights, ...]:
    """'0.1:0,0.3:0.5' (WEIGHT[:DICE] pairs) -> LabelWeights."""
    result = []
    for part in text.split(","):
        weight, _, dice = part.partition(":")
        try:
            values = float(weight), float(dice) if dice else LabelWeights.dice
        except ValueError:
            raise InputError(f"label weights {text!r}: expected WEIGHT[:DICE] pairs, e.g. 0.1:0,0.3:0.5") from None
        result.append(LabelWeights(*values))
    return tuple(result)


def check_classes(sketch: LabelledSketch, num_classes: int, name: str = "sketch") -> None:
    """Refuse a class map with a class the bundle does not have (one line)."""
    beyond = [c for c in sketch.drawn if c > num_classes]
    if beyond:
        raise InputError(f"{name}: strokes of class {beyond[0]}, but the bundle has classes 1-{num_classes}; "
                         f"use one of those (`python cli.py classes` lists them) or 0 for unlabelled strokes")


def resized_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """A label map (H, W) at size x size (nearest class)."""
    if labels.shape == (size, size):
        return labels
    return np.asarray(Image.fromarray(labels).resize((size, size), Image.NEAREST))


def class_outlines(labels: np.ndarray, class_index: int, size: int) -> np.ndarray:
    """The synthesized sketch (contours) of one class of a label map, at size x size; blank paper without it."""
    mask = resized_labels(labels, size) == class_index
    if not mask.any():
        return np.full((size, size), PAPER, np.uint8)
    return sketch_from_mask(mask.astype(np.uint8))


def class_fields(label_maps: list[np.ndarray], classes: list[int], size: int) -> torch.Tensor:
    """(N, len(classes), FIELD_GRID**2): the field of each class's contours in each label map
    (zeros where the map has none of that class)."""
    if not label_maps or not classes:
        return torch.zeros(len(label_maps), len(classes), 0)
    outlines = np.stack([class_outlines(labels, c, size) for labels in label_maps for c in classes])
    return sketch_field(outlines).reshape(len(label_maps), len(classes), -1)


def class_dice(labels: np.ndarray, stored: np.ndarray, class_index: int) -> float:
    """DICE (percent) of one class between two label maps (`stored` compared at the size of
    `labels`); 0 when neither has it."""
    stored = resized_labels(stored, labels.shape[0]) if stored.shape != labels.shape else stored
    predicted, reference = labels == class_index, stored == class_index
    total = int(predicted.sum()) + int(reference.sum())
    return 0.0 if total == 0 else 200.0 * int((predicted & reference).sum()) / total


def query_fields(sketch: LabelledSketch) -> torch.Tensor:
    """(len(sketch.drawn), FIELD_GRID**2): the field of the strokes of each drawn class."""
    return sketch_field(np.stack([sketch.strokes_of(c) for c in sketch.drawn]))


def class_match(sketch: LabelledSketch, labels: np.ndarray, candidate_fields: torch.Tensor, candidate_labels: list[np.ndarray],
                weights: LabelWeights) -> np.ndarray:
    """The class match (0-1, see the module docstring) of each candidate, float64 (N,).

    labels: S(x_hat), the query's masks; candidate_fields: `class_fields` of the candidates for
    `sketch.drawn`; candidate_labels: their stored masks."""
    drawn = sketch.drawn
    assert candidate_fields.shape[:2] == (len(candidate_labels), len(drawn)), (candidate_fields.shape, len(candidate_labels), drawn)
    if not drawn or not candidate_labels:
        return np.zeros(len(candidate_labels))
    fields = torch.einsum("ncd,cd->nc", candidate_fields.float(), query_fields(sketch).float()).numpy().astype(np.float64)
    if weights.dice > 0:
        dice = np.array([[class_dice(labels, stored, c) for c in drawn] for stored in candidate_labels]) / 100
        fields = (1 - weights.dice) * fields + weights.dice * dice
    return fields.mean(axis=1)


def labelled_scores(scores: np.ndarray, match: np.ndarray, weights: LabelWeights) -> np.ndarray:
    """(1 - weight) score + weight match."""
    return (1 - weights.weight) * np.asarray(scores, np.float64) + weights.weight * match
