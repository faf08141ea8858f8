"""Alignment re-ranking: the query's strokes fitted to each candidate's contours before they are compared.

A sketch drawn from memory is rotated, scaled and shifted against the image it depicts, and the
sketch field (a soft chamfer that tolerates a few pixels) then misses. For each FAISS candidate,
this stage finds the similarity transform (a `TransformGrid`: rotation x scale x every shift up to a
bound) that minimises the symmetric chamfer distance between the query's strokes and the contours
of the candidate's stored masks (S's label maps), exhaustively with FFTs on distance transforms
(`retrieval.oracle.AlignedChamfer`, at a `reduction` of the sketch resolution), and scores it

    alignment = exp(-d / tau),   d the aligned chamfer distance in pixels of the sketch's resolution,

in [0, 1], 0 when either side has no contour. `final_score` combines it with the similarity and
DICE terms. The contours are the label maps' borders (`mask_outlines`), not
`generation.sketch.sketch_from_mask`'s drawn contours: the same lines to within a pixel, found for
all candidates at once with array operations instead of a contour tracing per instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from generation.sketch import INK, PAPER
from retrieval.defaults import DEFAULT_ALIGNMENT
from retrieval.oracle import AlignedChamfer, TransformGrid
from retrieval.rerank import rerank_score


@dataclass(frozen=True)
class Alignment:
    """The alignment stage's parameters (defaults chosen on validation splits, docs/RESULTS.md)."""

    weight: float = DEFAULT_ALIGNMENT["weight"]  # share of the alignment term in the final score, 0 to 1
    tau: float = DEFAULT_ALIGNMENT["tau"]  # decay of exp(-d / tau), pixels of the sketch's resolution
    reduction: int = DEFAULT_ALIGNMENT["reduction"]  # matched at resolution / reduction
    grid: TransformGrid = field(default_factory=lambda: TransformGrid(**DEFAULT_ALIGNMENT["grid"]))

    def __post_init__(self) -> None:
        assert 0 <= self.weight <= 1 and self.tau > 0 and self.reduction >= 1, self


def mask_outlines(label_maps: Sequence[np.ndarray], resolution: int) -> np.ndarray:
    """uint8 (H, W) label maps, any sizes -> uint8 (N, resolution, resolution) sketches (INK on PAPER).

    Ink on every structure pixel (label > 0) whose label differs from one of its 4 neighbours: the
    inner border of each region. Neighbours beyond the frame count as equal, so regions cut by the
    frame get open contours, as in `generation.sketch`.
    """
    assert all(m.ndim == 2 and m.dtype == np.uint8 for m in label_maps), "label maps must be uint8 (H, W)"
    side = (resolution, resolution)
    label_maps = np.stack([m if m.shape == side else np.asarray(Image.fromarray(m).resize(side, Image.NEAREST)) for m in label_maps])
    padded = np.pad(label_maps, ((0, 0), (1, 1), (1, 1)), mode="edge")
    centre = padded[:, 1:-1, 1:-1]
    border = ((centre != padded[:, :-2, 1:-1]) | (centre != padded[:, 2:, 1:-1])
              | (centre != padded[:, 1:-1, :-2]) | (centre != padded[:, 1:-1, 2:]))
    return np.where(border & (centre > 0), INK, PAPER).astype(np.uint8)


@lru_cache(maxsize=8)
def alignment_matcher(resolution: int, alignment: Alignment) -> AlignedChamfer:
    """The alignment's matcher for sketches of `resolution` px, against no candidates yet (give
    them with `AlignedChamfer.against`; kept, as it is the same for every query). It works at
    `alignment.reduction` where that divides the resolution, else at full resolution."""
    reduction = alignment.reduction if resolution % alignment.reduction == 0 else 1
    return AlignedChamfer(np.zeros((0, resolution, resolution), np.uint8), alignment.grid, reduction)


def matched_distances(query: np.ndarray, matcher: AlignedChamfer) -> np.ndarray:
    """uint8 (R, R) query sketch against a matcher's candidates -> float (N,) aligned chamfer
    distances in pixels of R; inf where either side has no contour."""
    assert query.shape == (matcher.resolution,) * 2, query.shape
    return matcher.distances(query) * matcher.reduction if len(matcher.blank) else np.zeros(0)


def aligned_distances(query: np.ndarray, label_maps: Sequence[np.ndarray], alignment: Alignment) -> np.ndarray:
    """uint8 (R, R) query sketch, the N candidates' uint8 label maps (any size) -> float (N,) aligned
    chamfer distances in pixels of R; inf where either side has no contour (never raises on a
    sketch with little ink or ink only along one edge)."""
    resolution = query.shape[-1]
    assert query.shape == (resolution, resolution), query.shape
    if not len(label_maps):
        return np.zeros(0)
    matcher = alignment_matcher(resolution, alignment)
    return matched_distances(query, matcher.against(*matcher.spectra(mask_outlines(label_maps, resolution))))


def alignment_scores(distances: np.ndarray, tau: float) -> np.ndarray:
    """Aligned chamfer distances (pixels) -> exp(-d / tau) in [0, 1] (0 for inf)."""
    return np.exp(-np.asarray(distances, dtype=np.float64) / tau)


def final_score(similarity, dice, lam: float, alignment=None, weight: float = 0.0):
    """(1 - weight) * (lam * similarity + (1 - lam) * DICE / 100) + weight * alignment, for numbers or
    arrays; without an alignment score, the DICE re-ranking's score alone."""
    base = rerank_score(similarity, dice, lam)
    return base if alignment is None else (1 - weight) * base + weight * alignment
