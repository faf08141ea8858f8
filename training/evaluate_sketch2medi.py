"""What H adds: DICE(S(x_hat), S(x_ref)) after each refinement step, on synthesized and on simulated
free-hand sketches of held-out images, and a figure of the steps.

    python -m training.evaluate_sketch2medi --bundle B --data D --split test [--figure docs/x.png] [--json out.json]

Sketch kinds per image: `synthesized` = S's sketch of the image (what E and H were trained on);
`freehand S` = the free-hand simulator at strength S, drawn at 256 px from the image's mask
(the dataset's, else S's) and normalised like a user's sketch. Step 0 is E alone (x_0 = G(E(sketch))).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.freehand import freehand_sketch
from generation.images import square_resize, tensor_to_images
from retrieval.evaluate import SKETCH_SIZE
from retrieval.models import SystemModels
from retrieval.rerank import dice_score
from retrieval.search import load_sketch


def sketches_of(models: SystemModels, dataset: ImageDataset, index: int, strengths: tuple[float, ...], seed: int) -> dict[str, np.ndarray]:
    image = dataset.image(index)
    kinds = {"synthesized": models.S.synthesize([square_resize(image, models.S.config.size)], models.resolution)[0][0]}
    mask = dataset.mask(index, SKETCH_SIZE) if dataset.has_masks else None
    if mask is None:
        labels = models.S.predict_label_map([square_resize(image, models.S.config.size)])[0]
        mask = np.asarray(Image.fromarray(labels).resize((SKETCH_SIZE, SKETCH_SIZE), Image.NEAREST))
    for strength in strengths:
        try:
            kinds[f"freehand {strength:g}"] = load_sketch(freehand_sketch(mask, strength, np.random.default_rng([seed, index])), models.resolution)
        except InputError:
            pass  # nothing to draw
    return kinds


def evaluate_refinement(bundle: str | Path, data: str | Path, split: str = "test", strengths: tuple[float, ...] = (0.0, 0.5, 1.0),
                        limit: int | None = None, seed: int = 0, device: str = "auto",
                        models: SystemModels | None = None) -> tuple[dict, dict]:
    """(report, examples): mean DICE per sketch kind and step, and per image the sketches and steps.
    `models`: the bundle's networks if already loaded."""
    models = models if models is not None else SystemModels(bundle, device)
    dataset = ImageDataset(data, split)
    indices = list(range(len(dataset)))[:limit]
    T = models.sketch2medi.default_steps
    scores: dict[str, list[list[float]]] = {}
    examples: dict[int, dict] = {}
    with torch.no_grad():
        for index in indices:
            reference = square_resize(dataset.image(index), models.resolution)
            reference_labels = models.S.predict_label_map([square_resize(dataset.image(index), models.S.config.size)])[0]
            reference_labels = np.asarray(Image.fromarray(reference_labels).resize((models.resolution,) * 2, Image.NEAREST))
            kinds = sketches_of(models, dataset, index, strengths, seed)
            result = models.sketch2medi.generate(np.stack(list(kinds.values())), steps=T)
            steps = [tensor_to_images(step) for step in result.steps]  # (T + 1) x (K, R, R, 3)
            for k, kind in enumerate(kinds):
                labels = models.S.predict_label_map([step[k] for step in steps])
                scores.setdefault(kind, []).append([dice_score(l, reference_labels, models.label_classes) for l in labels])
            examples[index] = {"kinds": kinds, "steps": steps, "reference": reference}
    report = {"bundle": str(models.bundle), "data": str(data), "split": split, "images": len(indices), "steps": T,
              "dice": {kind: {f"step {t}": float(np.mean([row[t] for row in rows])) for t in range(T + 1)} | {"images": len(rows)}
                       for kind, rows in scores.items()}}
    return report, examples


def refinement_figure(examples: dict, out: str | Path, images: int = 3, kinds: tuple[str, ...] = ("freehand 0", "freehand 0.5", "freehand 1")) -> None:
    """Rows: (image, sketch kind); columns: sketch | x_0 (E alone) | x_1 .. x_T | reference."""
    rows = []
    for index in list(examples)[:images]:
        example = examples[index]
        names = list(example["kinds"])
        for kind in kinds:
            if kind not in names:
                continue
            k = names.index(kind)
            sketch = np.repeat(example["kinds"][kind][:, :, None], 3, axis=2)
            rows.append(np.concatenate([sketch, *[step[k] for step in example["steps"]], example["reference"]], axis=1))
    if not rows:
        raise InputError("no example to draw")
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    picture = picture.resize((picture.width * 2, picture.height * 2), Image.NEAREST)  # 64 px tiles are small
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--figure", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report, examples = evaluate_refinement(args.bundle, args.data, args.split, limit=args.limit)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.figure:
        refinement_figure(examples, args.figure)


if __name__ == "__main__":
    main()
