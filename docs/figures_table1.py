"""Render a figure like the paper's Fig. 3: free-hand sketch | each method's image | the real image.

    python docs/figures_table1.py --bundle BUNDLE --data DIR --split test --out docs/FIG.png [--rows 6] [--strength 1]

The sketches are `evaluate`'s queries: the simulator (`generation.freehand`) at `--strength` from
the image's true mask, seed 0, normalised as `search` normalises an upload. Columns are the methods
of the generation table that the bundle holds (pix2pix, CycleGAN, UNIT, U-GAT-IT when trained into
it; Sketch2MedI without H (E alone) and with H), at G's resolution, shown `--display` pixels wide
(nearest neighbour, so the resolution stays visible). The rows are `--rows` images evenly spaced
through the split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from anywhere

from generation.dataset import ImageDataset  # noqa: E402
from generation.freehand import freehand_labelled_sketch  # noqa: E402
from generation.images import tensor_to_images  # noqa: E402
from generation.registry import load_network, network_exists  # noqa: E402
from generation.sketch import sketch_to_tensor  # noqa: E402
from retrieval.evaluate import BASELINES, SKETCH_SIZE  # noqa: E402
from retrieval.models import SystemModels  # noqa: E402
from retrieval.search import load_sketch  # noqa: E402

TITLES = {"pix2pix": "pix2pix", "cyclegan": "CycleGAN", "unit": "UNIT", "ugatit": "U-GAT-IT",
          "no_refiner": "Sketch2MedI w/o H", "sketch2medi": "Sketch2MedI"}
GAP, HEADER = 4, 18


@torch.no_grad()
def render(bundle: Path, data: Path, split: str, rows: int, strength: float, display: int) -> Image.Image:
    models = SystemModels(bundle, "cpu")
    resolution = models.resolution
    dataset = ImageDataset(data)
    names = {sample.name for sample in ImageDataset(data, split).samples}
    indices = [i for i, sample in enumerate(dataset.samples) if sample.name in names]
    picks = [indices[int(i)] for i in np.linspace(0, len(indices) - 1, rows).round()]
    sketches = []
    for index in picks:  # the same drawing `evaluate` makes for this image, strength and seed 0
        rng = np.random.default_rng([0, index, round(strength * 1000)])
        drawing, _ = freehand_labelled_sketch(dataset.mask(index, SKETCH_SIZE), strength, rng)
        sketches.append(load_sketch(drawing, resolution))
    sketches_ = np.stack(sketches)
    result = models.sketch2medi.generate(sketches_)
    columns: dict[str, np.ndarray] = {}
    for name in BASELINES:
        if network_exists(models.bundle, name):
            network = load_network(name, models.bundle, models.device)
            columns[name] = tensor_to_images(network.translate(sketch_to_tensor(sketches_)))
    columns["no_refiner"] = tensor_to_images(result.steps[0])
    columns["sketch2medi"] = tensor_to_images(result.steps[-1])

    tiles = [("free-hand sketch", [np.repeat(s[..., None], 3, axis=2) for s in sketches])]
    tiles += [(TITLES[name], list(images)) for name, images in columns.items()]
    tiles.append(("real image", [dataset.image(index, resolution) for index in picks]))
    width = len(tiles) * (display + GAP) - GAP
    canvas = Image.new("RGB", (width, HEADER + rows * (display + GAP) - GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for column, (title, images) in enumerate(tiles):
        x = column * (display + GAP)
        draw.text((x + 2, 3), title, fill="black")
        for row, image in enumerate(images):
            tile = Image.fromarray(np.asarray(image, np.uint8)).resize((display, display), Image.NEAREST)
            canvas.paste(tile, (x, HEADER + row * (display + GAP)))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle with the baselines trained into it.")
    parser.add_argument("--data", type=Path, required=True, help="Dataset folder with images/ and masks/.")
    parser.add_argument("--split", default="test", help="Split whose images are sketched.")
    parser.add_argument("--rows", type=int, default=6, help="Number of sketches (rows).")
    parser.add_argument("--strength", type=float, default=1.0, help="Free-hand simulator strength (0 to 2).")
    parser.add_argument("--display", type=int, default=128, help="Width of one tile on the page, pixels.")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write.")
    args = parser.parse_args()
    render(args.bundle, args.data, args.split, args.rows, args.strength, args.display).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
