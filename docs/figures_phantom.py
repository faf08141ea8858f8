"""Render docs/phantom_grid.png: procedural pharyngeal phantoms, their masks and sketches.

    python docs/figures_phantom.py [--out docs/phantom_grid.png] [--seed 0]

Rows 1-3: twelve 256 px phantoms of dataset seed 0 (images 0-11). Row 4: one more phantom, its
class mask over the photo (uvula yellow, pharyngeal wall blue, tonsils green, tongue magenta), its
synthesized sketch (the generator's training input) and the mask alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from anywhere

from generation.phantom import image_seed, phantom_sample  # noqa: E402
from generation.sketch import sketch_from_mask  # noqa: E402

SIZE, GAP = 256, 4
CLASS_COLOURS = np.array([[0, 0, 0], [255, 220, 0], [40, 110, 255], [0, 200, 80], [230, 0, 200]], np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The photo with class colours blended in and class boundaries in white."""
    colours = CLASS_COLOURS[mask].astype(np.float32)
    blended = np.where(mask[..., None] > 0, 0.5 * image + 0.5 * colours, image.astype(np.float32))
    edge = np.zeros(mask.shape, bool)
    edge[:-1] |= mask[:-1] != mask[1:]
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    blended[edge] = 255
    return blended.astype(np.uint8)


def grid(seed: int) -> Image.Image:
    tiles = [phantom_sample(image_seed(seed, i), SIZE)[0] for i in range(12)]
    image, mask = phantom_sample(image_seed(seed, 12), SIZE)
    sketch = np.repeat(sketch_from_mask(mask)[..., None], 3, axis=2)
    tiles += [image, overlay(image, mask), sketch, CLASS_COLOURS[mask]]
    side = 4 * SIZE + 3 * GAP
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    for index, tile in enumerate(tiles):
        row, col = divmod(index, 4)
        canvas.paste(Image.fromarray(tile), (col * (SIZE + GAP), row * (SIZE + GAP)))
    draw = ImageDraw.Draw(canvas)
    for col, label in enumerate(["photo", "mask overlay", "synthesized sketch", "mask"]):
        x, y = col * (SIZE + GAP) + 6, 3 * (SIZE + GAP) + 6
        draw.rectangle((x - 3, y - 2, x + 6 * len(label) + 3, y + 12), fill=(0, 0, 0))
        draw.text((x, y), label, fill=(255, 255, 255))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "phantom_grid.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # 256 shared colours keep the PNG small (the photos carry sensor noise that does not compress)
    picture = grid(args.seed)
    palette = picture.quantize(256, method=Image.Quantize.MEDIANCUT)
    picture.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
