"""The canonical sketch format and the synthesized sketch (the paper's training input).

Canonical sketch: a square uint8 array, white paper (255) with black lines (0), lines
`line_width(size)` pixels wide (1 px up to 191 px, 2 px at 192-319 px, 3 px at 320-447 px, ...).
Every sketch the networks see has this form: synthesized sketches are drawn in it directly, and
user or simulated free-hand sketches are brought to it by `generation.normalize`.

A synthesized sketch is the contour of every instance of a segmentation, drawn on blank paper.
Instances of a class-index mask are the connected components of each class; specks below
`min_instance_area` are dropped. Contours are not drawn along the image frame: a region that
touches the border gets an open contour, as a person would draw it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from skimage import measure

from generation.errors import InputError

PAPER = 255
INK = 0


class Instance(NamedTuple):
    """One segmented object: dataset class index (1..), boolean mask (H, W), confidence."""

    class_index: int
    mask: np.ndarray
    score: float = 1.0


def line_width(size: int) -> int:
    """The canonical stroke width in pixels for a sketch of `size` x `size` pixels."""
    return max(1, int(size / 128 + 0.5))


def min_instance_area(height: int, width: int) -> int:
    """Connected components smaller than this (in pixels) are specks, not instances."""
    return max(4, round(0.0005 * height * width))


def mask_instances(mask: np.ndarray, min_area: int | None = None) -> list[tuple[int, np.ndarray]]:
    """Split a class-index mask (H, W) into instances: (class index, boolean mask) per component.

    Class 0 is background. Components use 8-connectivity. Ordered by class, then by label.
    """
    assert mask.ndim == 2, f"mask must be (H, W), got {mask.shape}"
    min_area = min_instance_area(*mask.shape) if min_area is None else min_area
    instances = []
    for class_index in np.unique(mask):
        if class_index == 0:
            continue
        labels = measure.label(mask == class_index, connectivity=2)
        for region in measure.regionprops(labels):
            if region.area >= min_area:
                instances.append((int(class_index), labels == region.label))
    return instances


def contour_strokes(instance: np.ndarray) -> list[np.ndarray]:
    """Contours of one boolean instance mask as polylines of (x, y) points, shape (N, 2).

    Closed contours repeat their first point at the end; contours that meet the frame stay open.
    """
    # Traced within the mask's bounding box and a one-pixel margin: the same contours, point for
    # point (the margin is background, so the marching squares meet nothing new), at a fraction of
    # the whole frame's cost.
    rows, cols = np.flatnonzero(instance.any(1)), np.flatnonzero(instance.any(0))
    if len(rows) == 0:
        return []
    top, left = max(rows[0] - 1, 0), max(cols[0] - 1, 0)
    box = instance[top : rows[-1] + 2, left : cols[-1] + 2]
    contours = measure.find_contours(box.astype(np.float32), 0.5)
    offset = np.array([left, top], np.float32)
    return [c[:, ::-1].astype(np.float32) + offset for c in contours if len(c) >= 2]


def draw_strokes(strokes: Iterable[np.ndarray], height: int, width: int, line: int | None = None) -> np.ndarray:
    """Draw polylines of (x, y) points as black lines on white paper; uint8 (height, width)."""
    line = line_width(max(height, width)) if line is None else line
    canvas = Image.new("L", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    for stroke in strokes:
        points = np.asarray(stroke, dtype=np.float64).ravel().tolist()  # x0, y0, x1, y1, ...: PIL's flat form
        if len(points) == 2:
            points = points * 2
        draw.line(points, fill=INK, width=line, joint="curve" if line > 2 else None)
    return np.asarray(canvas, dtype=np.uint8).copy()


def sketch_from_instances(instances: Sequence[np.ndarray], line: int | None = None) -> np.ndarray:
    """The synthesized sketch of a list of boolean instance masks (all the same (H, W))."""
    if not instances:
        raise ValueError("no instances to draw")
    height, width = instances[0].shape
    strokes = [stroke for instance in instances for stroke in contour_strokes(instance)]
    return draw_strokes(strokes, height, width, line)


def sketch_from_mask(mask: np.ndarray, line: int | None = None, min_area: int | None = None) -> np.ndarray:
    """The synthesized sketch of a class-index mask (H, W): contours of all its instances.

    A mask with no instance gives blank paper.
    """
    instances = [m for _, m in mask_instances(mask, min_area)]
    if not instances:
        return np.full(mask.shape, PAPER, dtype=np.uint8)
    return sketch_from_instances(instances, line)



def sketch_to_tensor(sketches):
    """Canonical uint8 sketches (N, R, R) or one (R, R) -> float (N, 1, R, R), ink 1 and paper 0.

    The networks see ink as signal on a zero background, so zero padding at the frame agrees
    with blank paper.
    """
    import torch

    if isinstance(sketches, np.ndarray):
        sketches = torch.from_numpy(np.ascontiguousarray(sketches))
    if isinstance(sketches, torch.Tensor) and sketches.ndim == 2:
        sketches = sketches[None]
    if not isinstance(sketches, torch.Tensor) or sketches.dtype != torch.uint8 or sketches.ndim != 3 \
            or sketches.shape[1] != sketches.shape[2]:
        kind, shape = getattr(sketches, "dtype", type(sketches).__name__), tuple(getattr(sketches, "shape", ()))
        raise InputError(f"sketches must be uint8 (N, R, R) canonical sketches, got {kind} {shape}")
    return (PAPER - sketches.to(torch.float32)).div_(PAPER).unsqueeze(1)


def sketch_as_image(sketch):
    """Sketch tensors (N, 1, R, R), ink 1 and paper 0 (`sketch_to_tensor`) -> the drawing as a grey
    image (N, 3, R, R) in [-1, 1]: white paper +1, black ink -1. The unpaired baselines treat
    sketches as pictures of their own domain, as image-to-image translation reads them from files."""
    assert sketch.ndim == 4 and sketch.shape[1] == 1, f"sketches must be (N, 1, R, R), got {tuple(sketch.shape)}"
    return (1 - 2 * sketch).expand(-1, 3, -1, -1)
