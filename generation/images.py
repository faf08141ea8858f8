"""Reading image files from disk: the one place that turns a path into pixels.

Everything the user hands us (archive images, masks, sketches) passes through here, so every
failure becomes an `InputError` whose message says what is wrong and what to do about it.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from generation.errors import InputError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Beyond this many pixels per side we refuse to decode: a sketch or archive image that large is a
# mistake (or a decompression bomb), and decoding it would take gigabytes.
MAX_SIDE = 8192


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, turning every failure into an `InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an image file")
    return decode_image(path, str(path))


def decode_image(source: Path | BinaryIO, name: str, draft_side: int | None = None) -> Image.Image:
    """Fully decode an image from a path or a binary stream (e.g. an upload); `name` says in the
    messages what it was. Every failure becomes an `InputError`. With `draft_side`, formats that can
    (JPEG) decode at a reduced scale that still has at least that many pixels per side."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            width, height = image.size
            if max(width, height) > MAX_SIDE:
                raise InputError(
                    f"{name}: {width}x{height} pixels is over the {MAX_SIDE}-pixel limit per side; "
                    "downscale the image first"
                )
            if draft_side is not None:
                image.draft(None, (draft_side, draft_side))
            image.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{name}: too many pixels to decode safely; downscale the image first")
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image PIL can read (PNG, JPEG, TIFF, BMP, ...)")
    except (OSError, SyntaxError, ValueError) as error:
        # PIL reports truncated or corrupt data as OSError ("image file is truncated", ...).
        raise InputError(f"{name}: corrupt or truncated image ({error}); re-export the file")
    return image


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def to_float_channels(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Pixels as float32 in [0, 1], shape (H, W, C) with C in {1, 3}, plus alpha (H, W) or None.

    Handles 1-bit, 8-bit, 16-bit and 32-bit integer/float grayscale, palette and colour modes.
    """
    alpha = None
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if image.mode.startswith("I;16"):
            scale = 65535.0
        else:
            low, high = float(values.min()), float(values.max())
            values, scale = values - low, max(high - low, 1e-6)
        return (values / scale)[..., None], alpha
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    values = np.asarray(image, dtype=np.float32) / 255.0
    if values.ndim == 2:
        values = values[..., None]
    return values, alpha


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """A decoded image as uint8 RGB, shape (H, W, 3). 16-bit and grayscale inputs are converted."""
    values, _ = to_float_channels(image)
    if values.shape[2] == 1:
        values = np.repeat(values, 3, axis=2)
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 RGB, shape (H, W, 3). 16-bit and grayscale inputs are converted."""
    return rgb_pixels(open_image(path))


def box_reduce(image: Image.Image, factor: int, mode: str) -> Image.Image:
    """`image` in `mode` (one PIL can reduce), box-reduced by an integer `factor` (the last block of
    a row or column may be partial). Converted and reduced in strips of whole factor x factor blocks,
    the same pixels as one reduce of the whole image, without another full-size copy."""
    width, height = image.size
    reduced = Image.new(mode, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, 256 // factor)
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(top + rows, height)))
        reduced.paste((strip if strip.mode == mode else strip.convert(mode)).reduce(factor), (0, top // factor))
    return reduced


def _reduction_mode(mode: str) -> str:
    """The mode to box-reduce an image of `mode` in so that `rgb_pixels` reads the same colours:
    alpha is dropped there anyway, and PIL reduces 16-bit grey only as 32-bit."""
    if mode in ("L", "RGB", "I", "F"):
        return mode
    if mode.startswith("I;16"):
        return "I"
    return "L" if mode in ("1", "LA", "PA") else "RGB"


def load_rgb_reduced(path: str | Path, side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_rgb` of an image file, reduced while it is decoded when its shorter side is at least
    2 * `side`: JPEG decodes at a reduced scale (`draft`), then the pixels are box-reduced by the
    largest integer factor that keeps the shorter side at `side` or more. Smaller images come back
    exactly as `load_rgb` gives them. Also returns the file's own (height, width)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as header:
                width, height = header.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        width = height = 0  # unreadable: `load_rgb` below says why
    if min(width, height) < 2 * side:
        pixels = load_rgb(path)
        return pixels, pixels.shape[:2]
    image = decode_image(Path(path), str(path), draft_side=side)
    factor = min(image.size) // side
    if factor > 1:
        mode = image.mode
        image = box_reduce(image, factor, _reduction_mode(mode))
        if mode.startswith("I;16"):
            image = image.convert("I;16")  # back to 16 bits, which `rgb_pixels` scales by 65535
    return rgb_pixels(image), (height, width)


def load_mask(path: str | Path) -> np.ndarray:
    """A class-index label map as uint8 (H, W); 0 is background/void."""
    image = open_image(path)
    if image.mode not in ("L", "P", "I", "I;16", "1"):
        raise InputError(f"{path}: a mask must be a single-channel class-index image, got mode {image.mode}")
    mask = np.asarray(image)
    if mask.max(initial=0) > 255:
        raise InputError(f"{path}: class indices above 255 are not supported")
    return mask.astype(np.uint8)


def find_images(root: str | Path) -> list[Path]:
    """Every image file under `root` (recursively), sorted; `root` may also be a single file."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such file or folder")
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def tensor_to_images(images) -> np.ndarray:
    """Network images, float (N, 3, R, R) in [-1, 1] -> uint8 (N, R, R, 3)."""
    import torch

    pixels = ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def square_resize(array: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Centre-crop to a square, then resize to size x size (area/Lanczos for images, nearest for masks)."""
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    array = array[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(array)
    resample = Image.NEAREST if nearest else Image.LANCZOS
    return np.asarray(Image.fromarray(array).resize((size, size), resample))


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (rows * H, columns * W, 3)."""
    import torch

    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    images = torch.cat([images, images.new_full((rows * columns - n, 3, h, w), -1.0)])
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return pixels.reshape(rows, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, 3).numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
