"""Figure: simulated free-hand sketches at strengths 0, 1 and 2 -> docs/freehand_strengths.png.

Rows are phantom samples (`generation.phantom.phantom_sample`). Columns: the image, then the
sketch at each strength.

    python docs/figures_freehand.py [--seed 0] [--out docs/freehand_strengths.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from generation.freehand import freehand_sketch
from generation.phantom import phantom_sample

STRENGTHS = (0.0, 1.0, 2.0)
SIZE = 256


def examples(count: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, class-index mask) pairs, SIZE x SIZE."""
    return [phantom_sample(seed, SIZE) for seed in range(count)]


def figure(seed: int) -> Image.Image:
    pairs = examples()
    header, gap = 22, 4
    columns = 1 + len(STRENGTHS)
    sheet = Image.new("RGB", (columns * (SIZE + gap) - gap, header + len(pairs) * (SIZE + gap) - gap), "white")
    draw = ImageDraw.Draw(sheet)
    notes = {0.0: " (synthesized)", 2.0: " (from memory)"}
    titles = ["image"] + [f"strength {s:g}" + notes.get(s, "") for s in STRENGTHS]
    for column, title in enumerate(titles):
        draw.text((column * (SIZE + gap) + 4, 5), title, fill="black")
    for row, (image, mask) in enumerate(pairs):
        tiles = [image]
        tiles += [freehand_sketch(mask, s, seed * 1000 + row) for s in STRENGTHS]
        for column, tile in enumerate(tiles):
            tile_image = Image.fromarray(tile).convert("RGB").resize((SIZE, SIZE))
            sheet.paste(tile_image, (column * (SIZE + gap), header + row * (SIZE + gap)))
        for column in range(1, columns):  # thin frame: the sketches are white on white
            x, y = column * (SIZE + gap), header + row * (SIZE + gap)
            draw.rectangle((x, y, x + SIZE - 1, y + SIZE - 1), outline=(190, 190, 190))
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("freehand_strengths.png"))
    args = parser.parse_args()
    # A 256-colour palette keeps the photos column small; the sketches are grey anyway.
    figure(args.seed).quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
