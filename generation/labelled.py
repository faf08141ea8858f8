"""Labelled sketches: strokes that say which class of the segmentation they outline.

A labelled sketch is a colour-coded image on white paper: each stroke is drawn in the colour of its
class (`CLASS_COLOURS`, class index -> RGB, the same table for every bundle) or in black (or grey:
an unlabelled stroke, as in a plain sketch). Decoding gives the canonical sketch exactly as
`generation.normalize` makes it of the same file, and beside it a class map: the class of each of
its ink pixels (0 for unlabelled ink and for paper).

How a pixel's colour is read, so that anti-aliasing and JPEG noise do not change the class:
1. Only stroke pixels count (those `normalize` keeps), so the photograph, empty and filled-shape
   tests are the same as for any sketch.
2. A stroke pixel p on paper b is a blend b - a (b - c) of b and its pen colour c (a = coverage:
   anti-aliased edges and faint pressure are small a). For each colour of the table the best a is
   found and the distance left over, |b - p - a (b - c)|, measured; the nearest colour within
   `TOLERANCE` wins, and a pixel near none (a colour not in the table, a blend of two pens where
   strokes cross) is unlabelled ink.
3. Only the solid part of each stroke (ink >= `SOLID_INK`) is read this way; each solid pixel then
   takes the class most solid pixels around it have (JPEG's colour noise flips single pixels, not
   a stroke), and the thin edges, where that noise is largest against the little ink left, take
   the class of the nearest solid pixel.
4. A class with fewer than `MIN_SHARE` of the solid pixels is noise, not a stroke: unlabelled.
Every colour of the table has one channel at 0, so its ink (the largest channel's distance from the
paper) is the coverage a, as for black: a colour-coded sketch normalises to the same canonical
sketch as the same strokes drawn in black.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from generation.bundle import network_entries
from generation.errors import InputError
from generation.images import open_image
from generation.normalize import clean_strokes, pad_to_square, redraw_canonical, reduce_to_work_side, resize_strokes, sketch_ink
from generation.sketch import INK, PAPER

# Class index -> the pen colour of its strokes. Chosen far apart as blends with white (the smallest
# distance left after the best blend between two of them, or black, is 0.36 of full scale), each
# with one channel at 0 (see the module docstring).
CLASS_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (228, 0, 0),  # red
    2: (0, 160, 0),  # green
    3: (0, 64, 255),  # blue
    4: (255, 128, 0),  # orange
    5: (200, 0, 200),  # magenta
    6: (0, 170, 200),  # teal
    7: (0, 0, 128),  # navy
    8: (128, 96, 0),  # olive
}
UNLABELLED = 0  # black or grey strokes, and colours not in the table
TOLERANCE = 0.15  # the largest distance left after the best blend (full scale 1) a pixel may have to be read as that colour
SOLID_INK = 0.5  # stroke pixels at least this far from the paper are read; fainter edges take their nearest solid pixel's class
MIN_SHARE = 0.01  # a class on fewer of the solid pixels than this is colour noise


def colour_hex(class_index: int) -> str:
    """'#rrggbb' of a class's pen colour."""
    return "#{:02x}{:02x}{:02x}".format(*CLASS_COLOURS[class_index])


def bundle_classes(bundle: str | Path) -> dict[int, str]:
    """The classes a bundle's S segments, index (1..) -> name, as its training data named them
    (`class N` where it recorded no name)."""
    entry = network_entries(Path(bundle)).get("S")
    if entry is None:
        raise InputError(f"{bundle}: has no synthesizer.safetensors; train it with `train synthesizer` (or `train all`)")
    names = {int(k): str(v) for k, v in (entry.get("classes") or {}).items()}
    return {i: names.get(i, f"class {i}") for i in range(1, int(entry["config"]["num_classes"]) + 1)}


def colour_table(bundle: str | Path) -> list[dict[str, object]]:
    """What a labelled sketch may use with this bundle: black for unlabelled strokes, then one row
    per class that has a colour: {"index", "name", "colour" ('#rrggbb')}."""
    rows: list[dict[str, object]] = [{"index": UNLABELLED, "name": "unlabelled", "colour": "#000000"}]
    rows += [{"index": i, "name": name, "colour": colour_hex(i)} for i, name in bundle_classes(bundle).items() if i in CLASS_COLOURS]
    return rows


@dataclass
class LabelledSketch:
    """A canonical sketch and the class of each of its ink pixels."""

    sketch: np.ndarray  # uint8 (R, R), canonical (`generation.sketch`)
    classes: np.ndarray  # uint8 (R, R): class index of each ink pixel; 0 on paper and for unlabelled ink

    def __post_init__(self) -> None:
        assert self.sketch.shape == self.classes.shape and self.sketch.ndim == 2, (self.sketch.shape, self.classes.shape)
        assert self.sketch.dtype == np.uint8 and self.classes.dtype == np.uint8, (self.sketch.dtype, self.classes.dtype)

    @property
    def drawn(self) -> list[int]:
        """The class indices some stroke carries, ascending."""
        return [int(c) for c in np.unique(self.classes[self.sketch == INK]) if c != UNLABELLED]

    def strokes_of(self, class_index: int) -> np.ndarray:
        """The canonical sketch of the strokes of one class only (blank paper if none)."""
        return np.where((self.sketch == INK) & (self.classes == class_index), INK, PAPER).astype(np.uint8)


def colour_coded(sketch: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """A sketch uint8 (H, W), black on white with grey anti-aliasing, and the class of each pixel
    (H, W) -> the colour-coded RGB image uint8 (H, W, 3): each pixel the blend of white and its
    class's colour (black for 0) with the sketch's coverage. The inverse of `decode_labelled_sketch`."""
    assert sketch.shape == classes.shape and sketch.ndim == 2, (sketch.shape, classes.shape)
    unknown = sorted(set(np.unique(classes).tolist()) - set(CLASS_COLOURS) - {UNLABELLED})
    if unknown:
        raise InputError(f"class {unknown[0]} has no colour; the colour table has classes 1-{max(CLASS_COLOURS)}")
    table = np.zeros((256, 3), np.float64)
    for index, colour in CLASS_COLOURS.items():
        table[index] = colour
    coverage = (PAPER - sketch.astype(np.float64)) / PAPER
    pixels = 255.0 - coverage[..., None] * (255.0 - table[classes])
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _on_white(image: Image.Image) -> np.ndarray:
    """RGB floats in [0, 1], transparent parts as white paper."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def _blend_distances(ink: np.ndarray) -> np.ndarray:
    """ink = paper - pixel, (N, 3) -> (N, 1 + colours) the distance left after the best blend with
    black (column 0) and with each colour of the table."""
    directions = np.array([(1.0, 1.0, 1.0)] + [tuple(1 - v / 255 for v in CLASS_COLOURS[k]) for k in sorted(CLASS_COLOURS)])
    coverage = np.clip(ink @ directions.T / (directions**2).sum(axis=1), 0.0, 1.0)  # (N, K)
    return np.linalg.norm(ink[:, None, :] - coverage[..., None] * directions[None], axis=2)


def pixel_classes(image: Image.Image, strokes: np.ndarray) -> np.ndarray:
    """The class (0 = unlabelled) of every stroke pixel of `image` (as `strokes`, (H, W) bool, marks
    them), 0 elsewhere; see the module docstring. Returns uint8 (H, W)."""
    pixels = _on_white(image)
    assert pixels.shape[:2] == strokes.shape, (pixels.shape, strokes.shape)
    paper = np.median(pixels.reshape(-1, 3), axis=0)
    classes = np.zeros(strokes.shape, np.uint8)
    if paper.mean() < 0.5:  # not white paper: a light-on-dark drawing has no colour code
        return classes
    ink = np.clip(paper - pixels, 0.0, 1.0)
    solid = strokes & (ink.max(axis=2) >= SOLID_INK)
    if not solid.any():
        return classes
    distances = _blend_distances(ink[solid])
    nearest = distances.argmin(axis=1)
    indices = np.array([UNLABELLED] + sorted(CLASS_COLOURS), np.uint8)
    classes[solid] = np.where(distances[np.arange(len(nearest)), nearest] <= TOLERANCE, indices[nearest], UNLABELLED)
    classes[solid] = _local_majority(classes, solid)[solid]
    counts = np.bincount(classes[solid], minlength=256)
    classes[solid & (counts[classes] < MIN_SHARE * solid.sum())] = UNLABELLED
    # Edges and faint parts: the class of the nearest solid pixel.
    _, (rows, cols) = ndimage.distance_transform_edt(~solid, return_indices=True)
    classes[strokes] = classes[rows[strokes], cols[strokes]]
    return classes


def _local_majority(classes: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """Each pixel's most frequent class among the solid pixels of a window around it (a side of
    about 1/48 of the image): a pen's stroke keeps its colour where noise made a few pixels read as
    another, and a colour not in the table stays unlabelled where parts of it happen to lie near one."""
    window = max(3, round(max(classes.shape) / 48) | 1)
    present = np.unique(classes[solid])
    votes = np.stack([ndimage.uniform_filter(((classes == c) & solid).astype(np.float32), window, mode="constant") for c in present])
    return present[votes.argmax(axis=0)].astype(np.uint8)


def _resize_classes(classes: np.ndarray, strokes: np.ndarray, sketch: np.ndarray) -> np.ndarray:
    """The square class map at the work size -> the class of each ink pixel of the canonical sketch:
    that of the nearest stroke pixel at the pixel's centre."""
    side, size = classes.shape[0], sketch.shape[0]
    result = np.zeros(sketch.shape, np.uint8)
    ink = sketch == INK
    if not ink.any():
        return result
    _, (rows, cols) = ndimage.distance_transform_edt(~strokes, return_indices=True)
    centres = np.minimum(((np.arange(size) + 0.5) * side / size).astype(np.int64), side - 1)
    r, c = np.nonzero(ink)
    result[r, c] = classes[rows[centres[r], centres[c]], cols[centres[r], centres[c]]]
    return result


def decode_labelled_sketch(image: Image.Image | np.ndarray, size: int, num_classes: int, name: str = "sketch") -> LabelledSketch:
    """A colour-coded sketch (PIL image or array) -> its canonical sketch at `size` and class map.

    num_classes: the bundle's classes (1..num_classes); strokes in the colour of any other class of
    the table are refused with one line. A plain (black) sketch gives exactly `normalize_sketch`'s
    sketch and no labelled strokes.
    """
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = reduce_to_work_side(image)
    strokes = clean_strokes(sketch_ink(image), name)
    classes = pixel_classes(image, strokes)
    beyond = sorted(set(np.unique(classes).tolist()) - set(range(num_classes + 1)))
    if beyond:
        raise InputError(f"{name}: strokes in the colour of class {beyond[0]} ({colour_hex(beyond[0])}), but the bundle has classes "
                         f"1-{num_classes}; redraw them in black or in one of the colours `python cli.py classes` lists")
    square, square_classes = pad_to_square(strokes), pad_to_square(classes)
    canonical = redraw_canonical(resize_strokes(square, size))
    if not (canonical == INK).any():
        raise InputError(f"{name}: the sketch is empty at {size} px; draw larger outlines")
    return LabelledSketch(canonical, _resize_classes(square_classes, square, canonical))


def decode_labelled_sketch_file(path, size: int, num_classes: int) -> LabelledSketch:
    """`decode_labelled_sketch` of an image file, with one-line errors for unreadable files."""
    return decode_labelled_sketch(open_image(path), size, num_classes, name=str(path))
