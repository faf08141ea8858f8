"""Render a figure of S on test images: image | reference mask | predicted mask | synthesized sketch.

    python docs/figures_synthesizer.py --bundle BUNDLE --data DIR --split test --out docs/FIG.png [--rows 4]

Masks are drawn in a fixed palette (class 1 yellow, 2 blue, 3 green, 4 magenta, 5 orange, 6 cyan);
the sketch is built from the predicted instances with confidence >= 0.35 (the paper's delta).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from anywhere

from generation.dataset import ImageDataset  # noqa: E402
from generation.registry import load_network  # noqa: E402
from generation.solov2 import label_map, sketch_of  # noqa: E402
from retrieval.metrics import dice_per_image  # noqa: E402

PALETTE = np.array(
    [[0, 0, 0], [255, 220, 0], [40, 110, 255], [0, 200, 80], [230, 0, 200], [255, 140, 0], [0, 220, 220], [200, 200, 200]],
    np.uint8,
)
GAP = 4


def render(bundle: Path, data: Path, split: str | None, rows: int, display: int) -> Image.Image:
    model = load_network("synthesizer", bundle)
    size = model.config.size
    dataset = ImageDataset(data, split=split)
    picks = np.linspace(0, len(dataset) - 1, rows).round().astype(int)
    images = [dataset.image(int(i), size) for i in picks]
    masks = [dataset.mask(int(i), size) for i in picks]
    tiles = []
    for image, mask, instances in zip(images, masks, model.predict(images)):
        predicted = label_map(instances, (size, size), 0.35)
        sketch = sketch_of(instances, (size, size), 0.35)
        dice, _ = dice_per_image(instances, mask, model.config.num_classes + 1, min_score=0.35)
        print(f"DICE {dice:.1f}")
        row = [image, PALETTE[mask % len(PALETTE)], PALETTE[predicted % len(PALETTE)], np.repeat(sketch[..., None], 3, 2)]
        tiles.append([np.asarray(Image.fromarray(t).resize((display, display), Image.NEAREST)) for t in row])
    canvas = np.full((rows * (display + GAP) - GAP, 4 * (display + GAP) - GAP, 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[r * (display + GAP) : r * (display + GAP) + display, c * (display + GAP) : c * (display + GAP) + display] = tile
    return Image.fromarray(canvas)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--display", type=int, default=192)
    args = parser.parse_args()
    render(args.bundle, args.data, args.split or None, args.rows, args.display).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
