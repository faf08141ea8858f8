"""Choosing the near-duplicate rule of `retrieval.grouping` on data with ground-truth masks.

Grouped search folds a frame into a better hit of the same sequence when their archive vectors'
inner product reaches `DUPLICATE_SIMILARITY` and their stored masks (S's) overlap with DICE >=
`DUPLICATE_MASK_DICE`. What should fold is a frame that shows the same view: here, a pair of frames
of one sequence (split.csv's `sequence` column, else the whole split) whose ground-truth masks
overlap with DICE >= `SAME_VIEW` percent. For each rule the table gives the pairs it would fold,
their precision (the share that are the same view) and recall (the share of same-view pairs
folded), over the splits named together. The rule chosen has the highest recall among those whose
precision reaches `MIN_PRECISION`: folding a different view hides a result, missing a duplicate
only repeats one.

    python -m retrieval.near_duplicates --data ../shared/data/vocalfolds256 --bundle bundles/vocalfolds --split val --split train
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from generation.dataset import ImageDataset
from generation.errors import InputError
from retrieval.metrics import dice_matrix
from retrieval.models import SystemModels
from retrieval.vector import ArchiveEmbedder

# Same view: ground-truth masks with DICE >= 80 %; in vocalfolds256's `train` sequences 1.4 % of
# the pairs of frames of one sequence reach it (its 99th percentile is 82.8).
SAME_VIEW = 80.0
MIN_PRECISION = 0.9
SIMILARITIES = (0.80, 0.85, 0.90, 0.95, 0.97)
MASK_DICES = (0.0, 85.0, 90.0, 95.0)


def sequence_pairs(dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of the dataset's samples that belong to one sequence."""
    sequences = {}
    path = dataset.root / "split.csv"
    if path.is_file():
        with path.open(newline="") as handle:
            sequences = {row["file"]: row.get("sequence") or "" for row in csv.DictReader(handle)}
    names = [sequences.get(sample.name, "") for sample in dataset.samples]
    first, second = np.triu_indices(len(names), k=1)
    same = np.array([names[i] == names[j] for i, j in zip(first, second)], bool)
    return first[same], second[same]


def rule_table(similarity: np.ndarray, mask_dice: np.ndarray, truth_dice: np.ndarray, similarities=SIMILARITIES,
               mask_dices=MASK_DICES, same_view: float = SAME_VIEW) -> list[dict]:
    """Per rule (similarity >= s and stored-mask DICE >= d): pairs folded, precision and recall against
    `truth_dice >= same_view` (NaN DICE: no structure in either, not the same view)."""
    assert similarity.shape == mask_dice.shape == truth_dice.shape, (similarity.shape, mask_dice.shape, truth_dice.shape)
    truth = np.nan_to_num(truth_dice, nan=0.0) >= same_view
    rows = []
    for s in similarities:
        for d in mask_dices:
            folded = (similarity >= s) & (np.nan_to_num(mask_dice, nan=0.0) >= d)
            hits = int((folded & truth).sum())
            rows.append({"similarity": s, "mask_dice": d, "folded": int(folded.sum()),
                         "precision": hits / folded.sum() if folded.any() else 1.0, "recall": hits / truth.sum() if truth.any() else 1.0})  # fmt: skip
    return rows


def choose(rows: list[dict], min_precision: float = MIN_PRECISION) -> dict:
    """The rule of highest recall whose precision reaches `min_precision` (ties: the stricter); the
    strictest rule if none does."""
    good = [row for row in rows if row["precision"] >= min_precision and row["folded"]]
    if not good:
        return max(rows, key=lambda row: (row["similarity"], row["mask_dice"]))
    return max(good, key=lambda row: (row["recall"], row["similarity"], row["mask_dice"]))


def pair_signals(models: SystemModels, dataset: ImageDataset, batch: int = 16) -> dict[str, np.ndarray]:
    """For the pairs of `sequence_pairs`: the archive vectors' inner product, the DICE of S's masks
    (what a workspace stores) and of the ground-truth masks."""
    embedder = ArchiveEmbedder(models)  # the vectors and masks `index` stores
    vectors, labels = [], []
    for start in range(0, len(dataset), batch):
        embedded = embedder.embed_images([dataset.image(i) for i in range(start, min(start + batch, len(dataset)))])
        vectors.append(embedded.vectors)
        labels.extend(embedded.label_maps)
    vectors, labels = np.concatenate(vectors), np.stack(labels)
    truth = np.stack([dataset.mask(i, models.resolution) for i in range(len(dataset))])
    classes = max(dataset.num_classes, int(truth.max()) + 1, int(labels.max()) + 1)
    first, second = sequence_pairs(dataset)
    return {"similarity": np.einsum("pd,pd->p", vectors[first], vectors[second]),
            "mask_dice": dice_matrix(labels, labels, classes)[first, second], "truth_dice": dice_matrix(truth, truth, classes)[first, second]}


def measure(data: str | Path, bundle: str | Path | None, splits: list[str], device: str = "cpu") -> dict:
    models = SystemModels(bundle, device)
    signals = []
    for split in splits:
        dataset = ImageDataset(data, split)
        if not dataset.has_masks:
            raise InputError(f"{data}: every image of split {split!r} needs a ground-truth mask")
        signals.append(pair_signals(models, dataset))
    pooled = {key: np.concatenate([s[key] for s in signals]) for key in signals[0]}
    rows = rule_table(**pooled)
    return {"data": str(data), "splits": splits, "bundle": str(models.bundle), "pairs": int(len(pooled["similarity"])),
            "same_view_pairs": int((np.nan_to_num(pooled["truth_dice"]) >= SAME_VIEW).sum()), "rows": rows, "chosen": choose(rows)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder (images/, masks/, split.csv)")
    parser.add_argument("--bundle", default=None, help="bundle folder")
    parser.add_argument("--split", action="append", default=None, help="a split whose frames are paired (repeat to pool; default val)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    try:
        report = measure(args.data, args.bundle, args.split or ["val"], args.device)
    except InputError as error:
        raise SystemExit(f"error: {error}")
    print(f"{report['pairs']} pairs of frames of one sequence in {', '.join(report['splits'])}, {report['same_view_pairs']} of the "
          f"same view (ground-truth mask DICE >= {SAME_VIEW:g})")
    print("| vector similarity >= | stored-mask DICE >= | pairs folded | precision | recall |\n|---|---|---|---|---|")
    for row in report["rows"]:
        print(f"| {row['similarity']:.2f} | {row['mask_dice']:g} | {row['folded']} | {row['precision']:.3f} | {row['recall']:.3f} |")
    chosen = report["chosen"]
    print(f"chosen (highest recall with precision >= {MIN_PRECISION:g}): similarity >= {chosen['similarity']:.2f}, "
          f"stored-mask DICE >= {chosen['mask_dice']:g}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
