"""Pictures the web application serves: archive images downscaled for display, mask overlays, PNG
encoding, and a small cache of encoded PNGs.

Memory: a large archive image is decoded once, at a reduced scale where the format allows (JPEG),
turned into every size the page shows, and dropped; only the small PNGs are kept. Decodes of
uploads and archive images run one at a time on one thread (`decoder_thread`), so concurrent
requests for large images cannot stack full-size pixels.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import io
import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from PIL import Image

from generation.images import decode_image

# Class c is drawn in PALETTE[(c - 1) % len]; the page shows the same colours in its legend.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)], np.uint8)
OVERLAY_ALPHA = 140
T = TypeVar("T")
# Modes whose pixels `indexing.files.load` gives unchanged (as RGB): those can be shown straight
# from PIL, downscaled before the conversion to RGB; every other mode goes through `load`.
DIRECT_MODES = ("RGB", "L")


def png_bytes(pixels: np.ndarray | Image.Image) -> bytes:
    buffer = io.BytesIO()
    (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(pixels)).decode("ascii")


def mask_overlay(labels: np.ndarray, alpha: int = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 label map (H, W) -> RGBA (H, W, 4): class colours, background transparent."""
    rgba = np.zeros((*labels.shape, 4), np.uint8)
    inside = labels > 0
    rgba[inside, :3] = PALETTE[(labels[inside].astype(np.int64) - 1) % len(PALETTE)]
    rgba[inside, 3] = alpha
    return rgba


def fit(width: int, height: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def placed_overlay(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """The stored masks cover the centre square the networks saw (`square_resize`): place them there
    on an image-sized transparent layer, so the page can stack it exactly over image.png."""
    side = min(width, height)
    square = np.asarray(Image.fromarray(labels).resize((side, side), Image.NEAREST))
    layer = np.zeros((height, width), np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    layer[top : top + side, left : left + side] = square
    return mask_overlay(layer)


def thumbnail_size(width: int, height: int, side: int) -> tuple[int, int] | None:
    """The size `Image.thumbnail((side, side))` gives (None: it already fits), so that several sizes
    can be made from one decoded image without copying it."""
    if side >= width and side >= height:
        return None
    aspect = width / height

    def nearest(number: float, error: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=error), 1)

    if 1 >= aspect:
        return nearest(side * aspect, lambda n: abs(aspect - n / side)), side
    return side, nearest(side / aspect, lambda n: 0 if n == 0 else abs(aspect - side / n))


def shown_pngs(path: Path, frame: int, sides: tuple[int, ...]) -> dict[int, bytes]:
    """An archive entry as RGB PNGs fitting each of `sides` (never enlarged), from one decode."""
    from indexing.files import is_dicom, load

    image = decode_image(path, str(path), draft_side=2 * max(sides)) if not is_dicom(path) else None
    if image is None or image.mode not in DIRECT_MODES:
        image = Image.fromarray(load(path, frame))
    shown = {}
    for side in sides:
        size = thumbnail_size(*image.size, side)
        picture = image if size is None else image.resize(size, Image.LANCZOS, reducing_gap=2.0)
        shown[side] = picture.convert("RGB") if picture.mode != "RGB" else picture
    return {side: png_bytes(picture) for side, picture in shown.items()}


def decoder_thread() -> ThreadPoolExecutor:
    """The one thread that decodes uploads and archive images (submit `released(function, ...)`).
    One decode at a time bounds the full-size pixels held at once (an 8000^2 RGBA PNG takes about
    512 MB while it is reduced), and one thread keeps them in one malloc arena: glibc gives each
    thread its own, and buffers freed across many arenas kept the server's RSS at several GB."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="sketch2medi-decode")


def released(function: Callable[..., T], *args) -> T:
    """`function(*args)`, then the memory it freed handed back to the system (glibc keeps freed
    buffers in its heap otherwise, and the RSS would stay at the largest decode's peak)."""
    try:
        return function(*args)
    finally:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc: nothing to trim
        return None


_LIBC = _glibc()


class PictureCache:
    """A least-recently-used cache of encoded PNGs, bounded in bytes, so a results grid shown again
    costs no decoding."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes, self.used, self._items, self._lock = max_bytes, 0, OrderedDict(), threading.Lock()

    def lookup(self, key) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                self.used -= len(self._items.pop(key))
            self._items[key] = value
            self.used += len(value)
            while self.used > self.max_bytes and len(self._items) > 1:
                self.used -= len(self._items.popitem(last=False)[1])

    def get(self, key, make: Callable[[], bytes]) -> bytes:
        found = self.lookup(key)
        if found is None:
            found = make()
            self.put(key, found)
        return found
