"""The `oracle` reference of `evaluate`: chamfer matching after the best similarity transform.
(`AlignedChamfer` is also the search's alignment stage, `retrieval.align`, on the candidates' contours.)

What a perfect synthesizer plus alignment could reach: the query is compared with each archive
image's contours drawn from its ground-truth masks, by the symmetric mean chamfer distance after
the rotation, scale and shift (a `TransformGrid`, searched exhaustively) that fit it best.

For one rotation and scale the distance at every shift is a pair of cross-correlations on
distance transforms, done with FFTs for the whole archive at once:

    query -> archive   sum over query ink q of DT_archive(q + t)   = corr(DT_archive, ink_query)
    archive -> query   sum over archive ink a of DT_query(a - t)  = corr(ink_archive, DT_query)

Both are computed on a canvas padded by twice the largest shift, so no shift wraps around. The
query's ink is rotated and scaled about the image centre; ink taken beyond the largest shift
outside the frame is dropped (it cannot come back into the frame). Sketches are matched at a
`reduction` of their resolution (ink pooled over reduction x reduction blocks; shifts in steps of
that many pixels): at 2, 35 transforms against 536 archive images take 1-2 s per query on 2 CPU cores.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from generation.sketch import INK


@dataclass(frozen=True)
class TransformGrid:
    """The similarity transforms tried: every rotation with every scale and every shift."""

    rotations: tuple[float, ...] = (-15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0)  # degrees
    scales: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.25)
    shift: float = 0.12  # largest shift along each axis, a fraction of the side (every pixel up to it)


class AlignedChamfer:
    """`AlignedChamfer(outlines).distances(query)`: per archive sketch, the best aligned chamfer distance.

    outlines: uint8 (N, R, R) sketches (ink == INK), the archive's ground-truth contours; R a
    multiple of `reduction`. Distances are in pixels of the reduced grid, the mean of the two
    directions; inf for a blank sketch on either side.
    """

    def __init__(self, outlines: np.ndarray, grid: TransformGrid = TransformGrid(), reduction: int = 2):
        _, resolution, resolution_x = outlines.shape
        assert resolution == resolution_x and resolution % reduction == 0, f"outlines of {outlines.shape} with reduction {reduction}"
        self.grid, self.resolution, self.reduction = grid, resolution, reduction
        self.side = resolution // reduction
        self.reach = max(1, math.ceil(grid.shift * self.side))  # the largest shift, pixels of the reduced grid
        self.pad = 2 * self.reach
        self.canvas = (self.side + 2 * self.pad,) * 2
        self.blank, self.archive_transforms, self.archive_ink = self.spectra(outlines)
        # Only the shifts up to `reach` are needed: an inverse DFT evaluated at those offsets alone,
        # as two small matrix products (rows, then the half spectrum's columns, doubled where
        # their conjugates were left out), is far cheaper than the whole inverse FFT.
        size = self.canvas[0]
        offsets = np.arange(-self.reach, self.reach + 1)
        frequencies = np.arange(size)
        self.rows = torch.from_numpy(np.exp(2j * np.pi * np.outer(offsets, frequencies) / size).astype(np.complex64))
        half = np.arange(size // 2 + 1)
        weights = np.where((half == 0) | (2 * half == size), 1.0, 2.0) / size**2
        columns = weights[:, None] * np.exp(2j * np.pi * np.outer(half, offsets) / size)
        self.columns = torch.from_numpy(columns.astype(np.complex64))

    def spectra(self, outlines: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """The archive side of the matching for uint8 (N, R, R) outlines: blank (N,) bool, and the
        spectra of their distance transforms and of their ink (normalised to sum 1), complex (N, h, w)."""
        assert outlines.shape[1:] == (self.resolution,) * 2, f"outlines of {outlines.shape} for a {self.resolution} px matcher"
        ink = np.pad(self._pooled_ink(outlines), ((0, 0), (self.pad, self.pad), (self.pad, self.pad)))
        blank = ~ink.any(axis=(1, 2))
        transforms = np.zeros(ink.shape)
        for row in np.flatnonzero(~blank):
            transforms[row] = ndimage.distance_transform_edt(~ink[row])
        counts = np.maximum(ink.sum(axis=(1, 2)), 1)[:, None, None]
        if not len(ink):  # MKL's FFT refuses an empty batch
            empty = torch.zeros((0, self.canvas[0], self.canvas[1] // 2 + 1), dtype=torch.complex64)
            return blank, empty, empty.clone()
        return (blank, torch.fft.rfft2(torch.from_numpy(transforms.astype(np.float32))),
                torch.fft.rfft2(torch.from_numpy((ink / counts).astype(np.float32))))

    def against(self, blank: np.ndarray, transforms: torch.Tensor, ink: torch.Tensor) -> AlignedChamfer:
        """This matcher (grid, reduction, resolution) against another archive, given as rows of
        `spectra` (kept from earlier calls, for instance)."""
        assert len(blank) == len(transforms) == len(ink) and transforms.shape[1:] == self.archive_transforms.shape[1:]
        other = copy.copy(self)
        other.blank, other.archive_transforms, other.archive_ink = blank, transforms, ink
        return other

    def _pooled_ink(self, sketches: np.ndarray) -> np.ndarray:
        """(..., R, R) uint8 -> (..., R / reduction, R / reduction) bool: any ink in each block."""
        f, side = self.reduction, self.side
        return (sketches == INK).reshape(*sketches.shape[:-2], side, f, side, f).any(axis=(-3, -1))

    def distances(self, query: np.ndarray) -> np.ndarray:
        """uint8 (R, R) query sketch -> float (N,) distances; all inf for a blank query."""
        assert query.shape == (self.resolution,) * 2, f"query must be {self.resolution} px square, got {query.shape}"
        best = torch.full((len(self.blank),), math.inf)
        ys, xs = np.nonzero(self._pooled_ink(query))
        if not len(xs):
            return best.numpy().astype(np.float64)
        centre = (self.side - 1) / 2
        points = np.stack([xs - centre, ys - centre], axis=1).astype(np.float64)
        for angle in self.grid.rotations:
            theta = math.radians(angle)
            rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            for scale in self.grid.scales:
                moved = np.rint(centre + self.pad + scale * points @ rotation.T).astype(int)
                keep = np.all((moved >= self.pad - self.reach) & (moved < self.pad + self.side + self.reach), axis=1)
                if not keep.any():
                    continue
                best = torch.minimum(best, self._best_shift(moved[keep]))
        best[torch.from_numpy(self.blank)] = math.inf
        return best.numpy().astype(np.float64)

    def _best_shift(self, points: np.ndarray) -> torch.Tensor:
        """(N,) the smallest symmetric chamfer over all shifts of the query ink at `points` (x, y)."""
        ink = np.zeros(self.canvas, dtype=bool)
        ink[points[:, 1], points[:, 0]] = True
        query_ink = np.fft.rfft2(ink / ink.sum())
        query_transform = np.fft.rfft2(ndimage.distance_transform_edt(~ink))
        # Correlations as products with the conjugate: score[t] = the sum of both directions at shift t.
        spectrum = (self.archive_transforms * torch.from_numpy(query_ink.conj().astype(np.complex64))
                    + self.archive_ink * torch.from_numpy(query_transform.conj().astype(np.complex64)))
        scores = (self.rows @ spectrum @ self.columns).real
        return scores.flatten(1).amin(dim=1) / 2
