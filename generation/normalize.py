"""Bring any user sketch to the canonical form of `generation.sketch` (black lines on white).

Steps, each for a reason:
1. Decode any PIL-readable file and mode (1, L, P, RGB, RGBA, 16-bit). Strokes on a transparent
   background are composited onto a backdrop that contrasts with them.
2. Ink = distance of each pixel's colour from the background colour (the median colour, since a
   sketch is mostly background). This detects the polarity: dark-on-light, light-on-dark and
   coloured pens all give the same ink map.
3. Refuse what is not a line sketch: no ink at all (empty), a page that is not plain, or too much,
   too wide ink (a photograph).
4. Threshold relative to the stroke intensity (faint pencil and bold marker both survive) and drop
   specks (scanner or JPEG noise).
5. Pad to a square with background, resize, thin to one-pixel lines and redraw it at the
   canonical line width, so a thick marker and a fine pen give the same sketch as the synthesized
   sketches the encoder was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import morphology

from generation.errors import InputError
from generation.images import box_reduce, open_image, to_float_channels
from generation.sketch import INK, PAPER, line_width

# Decoding work beyond this many pixels per side buys nothing at sketch resolution.
WORK_SIDE = 2048
# The photograph test: at least PLAIN_SHARE of the pixels within PLAIN_INK of the background colour.
# Measured on the free-hand sketches of vocalfolds256: >= 0.91 even with noise of sigma 0.03 or JPEG
# at quality 40; the vocalfolds frames and phantoms converted to grey: <= 0.46.
PLAIN_INK = 0.05
PLAIN_SHARE = 0.6
# Stroke widths are measured on a copy of at most this many pixels per side: thinning, the costly
# step of a large upload's normalisation, grows with the area, and the photograph test needs no finer.
WIDTH_SIDE = 256


def reduce_to_work_side(image: Image.Image) -> Image.Image:
    """An image over WORK_SIDE per side, box-reduced by an integer factor to fit (in RGB, or RGBA
    when it has transparency); smaller ones as they are. Reducing a large upload as soon as it is
    decoded frees its full-size pixels early and gives the same sketch."""
    if max(image.size) <= WORK_SIDE:
        return image
    factor = -(-max(image.size) // WORK_SIDE)
    mode = "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
    return box_reduce(image, factor, mode)


def sketch_ink(image: Image.Image) -> np.ndarray:
    """Ink map in [0, 1], shape (H, W): how far each pixel is from the background colour."""
    values, alpha = to_float_channels(reduce_to_work_side(image))
    if alpha is not None and np.mean(alpha < 0.5) > 0.2:
        # Strokes on a transparent layer: put them on paper of the opposite brightness.
        opaque = alpha >= 0.5
        stroke_brightness = float(values[opaque].mean()) if opaque.any() else 0.0
        backdrop = 1.0 if stroke_brightness < 0.5 else 0.0
        values = values * alpha[..., None] + backdrop * (1.0 - alpha[..., None])
    background = np.median(values.reshape(-1, values.shape[2]), axis=0)
    return np.abs(values - background).max(axis=2)


def clean_strokes(ink: np.ndarray, name: str = "sketch") -> np.ndarray:
    """Boolean stroke mask from an ink map; raises InputError for empty sketches and photographs."""
    return _clean_strokes(ink, name)[0]


def _clean_strokes(ink: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """`clean_strokes`, and the strokes' skeleton where the photograph test thinned them at full size
    (None where it thinned a reduced copy), for `normalize_sketch` to reuse."""
    side = max(ink.shape)
    if ink.max() < 0.15:
        raise InputError(f"{name}: the sketch is empty; draw the outlines of the anatomy as lines")
    # A sketch's page is plain: most pixels lie within PLAIN_INK of the background colour, even
    # through scanner noise or JPEG. A photograph's smooth shading does not, grey ones included.
    if np.mean(ink < PLAIN_INK) < PLAIN_SHARE:
        raise InputError(
            f"{name}: looks like a photograph, not a line sketch; draw dark lines on a plain light background"
        )
    strong = ink[ink > 0.1]
    threshold = float(np.clip(0.5 * np.percentile(strong, 95), 0.1, 0.5))
    strokes = ink > threshold
    speck = max(3, round(3 * (side / 256) ** 2))
    strokes = morphology.remove_small_objects(strokes, max_size=speck - 1, connectivity=2)
    if not strokes.any():
        raise InputError(f"{name}: the sketch is empty (only specks); draw the outlines of the anatomy as lines")
    if strokes.mean() > 0.3:
        raise _filled(name)
    factor = max(1, max(strokes.shape) // WIDTH_SIDE)
    skeleton = morphology.thin(strokes) if factor == 1 else None
    if mean_stroke_width(strokes, skeleton) > 0.05 * side:
        raise _filled(name)
    return strokes, skeleton


def _filled(name: str) -> InputError:
    return InputError(f"{name}: looks like a photograph or filled shapes, not a line sketch; draw outlines only")


def mean_stroke_width(strokes: np.ndarray, skeleton: np.ndarray | None = None) -> float:
    """Mean width in pixels of a boolean stroke mask: its area over its skeleton's length. Above
    WIDTH_SIDE per side, measured on the mask reduced by a whole factor f (a block is ink if any of
    its pixels is) and scaled back by f: for line drawings within f pixels of the full-size measure;
    filled shapes, thinned to a few pixels there, come out far wider, as the photograph test wants.
    `skeleton`: `morphology.thin(strokes)` if already computed (only used at factor 1)."""
    factor = max(1, max(strokes.shape) // WIDTH_SIDE)
    if factor == 1 and skeleton is not None:
        return strokes.sum() / max(1, int(skeleton.sum()))
    if factor > 1:
        height, width = (-(-n // factor) * factor for n in strokes.shape)
        padded = np.zeros((height, width), bool)
        padded[: strokes.shape[0], : strokes.shape[1]] = strokes
        strokes = padded.reshape(height // factor, factor, width // factor, factor).any(axis=(1, 3))
    return factor * strokes.sum() / max(1, int(morphology.thin(strokes).sum()))


def pad_to_square(strokes: np.ndarray) -> np.ndarray:
    """Centred in a square of zeros (False), keeping the dtype (stroke masks, class maps)."""
    height, width = strokes.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.zeros((side, side), dtype=strokes.dtype)
    square[top : top + height, left : left + width] = strokes
    return square


def resize_strokes(strokes: np.ndarray, size: int) -> np.ndarray:
    """Resize a square boolean stroke mask so that no stroke breaks: downscaling keeps any pixel a
    stroke touches (box coverage > 5 %); upscaling is nearest-neighbour (interpolation would open gaps
    in one-pixel diagonals)."""
    if strokes.shape[0] == size:
        return strokes
    if strokes.shape[0] < size:
        # Via 8-bit: PIL's mode-1 arrays come back as bools stored as 255, which breaks skimage.
        return np.asarray(Image.fromarray(strokes.astype(np.uint8)).resize((size, size), Image.NEAREST)) > 0
    coverage = Image.fromarray(strokes.astype(np.float32)).resize((size, size), Image.BOX)
    return np.asarray(coverage) > 0.05


def redraw_canonical(strokes: np.ndarray, skeleton: np.ndarray | None = None) -> np.ndarray:
    """Thin to one-pixel lines (ends kept, unlike skeletonize) and redraw at the canonical width.
    `skeleton`: `morphology.thin(strokes)` if already computed."""
    size = strokes.shape[0]
    skeleton = morphology.thin(strokes) if skeleton is None else skeleton
    width = line_width(size)
    lines = morphology.dilation(skeleton, np.ones((width, width), bool)) if width > 1 else skeleton
    return np.where(lines, INK, PAPER).astype(np.uint8)


def normalize_sketch(image: Image.Image | np.ndarray, size: int = 256, name: str = "sketch") -> np.ndarray:
    """Canonical sketch (size, size) uint8 from a PIL image or array of any mode, polarity and size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    strokes, skeleton = _clean_strokes(sketch_ink(image), name)
    if strokes.shape == (size, size) and skeleton is not None:  # a synthesized sketch: thinned once
        canonical = redraw_canonical(strokes, skeleton)
    else:
        canonical = redraw_canonical(resize_strokes(pad_to_square(strokes), size))
    if not (canonical == INK).any():
        raise InputError(f"{name}: the sketch is empty at {size} px; draw larger outlines")
    return canonical


def normalize_sketch_file(path: str | Path, size: int = 256) -> np.ndarray:
    """`normalize_sketch` of an image file, with one-line errors for unreadable files."""
    return normalize_sketch(open_image(path), size, name=str(path))
