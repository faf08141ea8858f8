"""Choosing the search's defaults on validation queries: vector weights, lambda and the alignment.

    python -m retrieval.choose --data ../shared/data/vocalfolds256 --split val --bundle bundles/vocalfolds \
        --sketches ../shared/data/vocalfolds256-sketches --out choice.json

The queries are `evaluate`'s (simulated free-hand sketches of the split's images at strengths 0, 1
and 2, 2 seeds, and the drawn sketches), the archive every image of the dataset, each query's
right answer its image. The networks run once per query; every combination of the grid below is
then ranked exactly as `evaluate`'s `full` row (and so `search`) ranks: the first stage by the
fused vector, its top `candidates` re-ranked by `retrieval.align.final_score`. Printed per
combination and query set: R@1, R@10, MRR, DICE@10 and the first stage's candidate recall@100 and
@200; combinations are ordered by the mean MRR over the query sets.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from generation.dataset import ImageDataset
from generation.images import tensor_to_images
from retrieval.align import mask_outlines
from retrieval.evaluate import RELEVANCE_DEPTH, EvaluationOptions, drawn_queries, embed_archive, make_queries
from retrieval.metrics import dice_matrix
from retrieval.models import SystemModels
from retrieval.oracle import AlignedChamfer, TransformGrid
from retrieval.rerank import dice_score
from retrieval.vector import VectorRecipe, fuse_vectors, sketch_field

RECIPES = ((0.9, 0.05, 0.05), (0.8, 0.2, 0.0), (0.75, 0.25, 0.0), (0.7, 0.3, 0.0), (0.6, 0.4, 0.0), (0.5, 0.5, 0.0), (0.4, 0.6, 0.0),
           (0.25, 0.75, 0.0), (0.5, 0.4, 0.1))
LAMBDAS = (0.9, 0.97, 1.0)
WEIGHTS = (0.0, 0.1, 0.3, 0.5)  # of the alignment
TAUS = (0.5, 1.0, 2.0)
GRIDS = {
    "3x3 r4": (TransformGrid(rotations=(-10.0, 0.0, 10.0), scales=(0.85, 1.0, 1.2), shift=0.12), 4),
    "7x5 r4": (TransformGrid(), 4),
}


def ranks_of(similarity: np.ndarray, dice: np.ndarray, aligned: np.ndarray | None, targets: np.ndarray, relevance: np.ndarray,
             candidates: int, lam: float, weight: float, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: the rank of its image as `evaluate`'s `full` ranks, the first stage's rank, and DICE@10."""
    ranks, first, top_dice = (np.zeros(len(targets)) for _ in range(3))
    for q, target in enumerate(targets):
        order = np.argsort(-similarity[q], kind="stable")
        top = order[:candidates]
        score = lam * similarity[q, top] + (1 - lam) * dice[q, top] / 100
        if weight > 0:
            score = (1 - weight) * score + weight * np.exp(-aligned[q, top] / tau)
        final = np.concatenate([top[np.argsort(-score, kind="stable")], order[candidates:]])
        ranks[q] = np.nonzero(final == target)[0][0] + 1
        first[q] = np.nonzero(order == target)[0][0] + 1
        top_dice[q] = relevance[target][final[:RELEVANCE_DEPTH]].mean()
    return ranks, first, top_dice


@torch.no_grad()
def choose(data: str, split: str, bundle: str, sketches: str | None, candidates: int) -> list[dict]:
    models = SystemModels(bundle, "cpu")
    dataset = ImageDataset(data)
    names = {sample.name for sample in ImageDataset(data, split).samples}
    options = EvaluationOptions()
    archive = embed_archive(models, dataset, options, lambda *_: None)
    queries, _ = make_queries(dataset, [i for i, s in enumerate(dataset.samples) if s.name in names], models.resolution, options,
                              archive.labels)
    if sketches:
        drawn = drawn_queries(dataset, sketches, models.resolution)
        for name in ("target", "group", "sketches"):
            getattr(queries, name).extend(getattr(drawn, name))
    codes, embeddings, labels = [], [], []
    for start in range(0, len(queries.target), options.batch):
        result = models.sketch2medi.generate(np.stack(queries.sketches[start:start + options.batch]))
        embeddings.append(F.normalize(models.C.embed(result.steps[-1]), dim=1).cpu())
        labels.extend(models.S.predict_label_map(list(tensor_to_images(result.steps[-1]))))
        codes.append(result.w.cpu() - models.code_mean.cpu())
    sketch_array = np.stack(queries.sketches)
    fields = sketch_field(sketch_array)
    classes = max(models.label_classes, dataset.num_classes)
    truth = np.stack([dataset.mask(i, models.resolution) for i in range(len(dataset))]).astype(np.uint8)
    relevance = np.nan_to_num(dice_matrix(truth, truth, classes))
    dice = np.array([[dice_score(query, stored, models.label_classes) for stored in archive.labels] for query in labels])
    outlines = mask_outlines(list(archive.labels), models.resolution)
    aligned = {}
    for name, (grid, reduction) in GRIDS.items():
        matcher = AlignedChamfer(outlines, grid, reduction)
        aligned[name] = np.stack([matcher.distances(sketch) * reduction for sketch in sketch_array])
    targets, groups = np.array(queries.target), np.array(queries.group)
    rows = []
    for recipe in RECIPES:
        vector = VectorRecipe(*recipe)
        archive_vectors = torch.from_numpy(fuse_vectors(archive.fields, archive.codes, archive.embeddings, vector))
        query_vectors = torch.from_numpy(fuse_vectors(fields, torch.cat(codes), torch.cat(embeddings), vector))
        similarity = (query_vectors @ archive_vectors.T).double().numpy()
        settings = [(lam, 0.0, 1.0, "-") for lam in LAMBDAS]
        settings += [(0.97, w, tau, g) for w, tau, g in itertools.product(WEIGHTS[1:], TAUS, GRIDS)]
        for lam, weight, tau, grid in settings:
            ranks, first, top_dice = ranks_of(similarity, dice, aligned.get(grid), targets, relevance, candidates, lam, weight, tau)
            sets = {}
            for group in dict.fromkeys(groups):
                chosen = groups == group
                r = ranks[chosen]
                sets[group] = {"recall@1": float(np.mean(r <= 1)), "recall@10": float(np.mean(r <= 10)), "mrr": float(np.mean(1 / r)),
                               "dice@10": float(top_dice[chosen].mean()), "candidates@100": float(np.mean(first[chosen] <= 100)),
                               "candidates@200": float(np.mean(first[chosen] <= 200)), "queries": int(chosen.sum())}
            rows.append({"weights": vector.tag, "lambda": lam, "alignment": {"weight": weight, "tau": tau, "grid": grid},
                         "mean_mrr": float(np.mean([s["mrr"] for s in sets.values()])), "sets": sets})
    rows.sort(key=lambda row: -row["mean_mrr"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--sketches", help="a folder of drawn sketches (sketches/NAME.png), queried too")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.split == "test":
        parser.error("choose on a validation split, never on test")
    rows = choose(args.data, args.split, args.bundle, args.sketches, args.candidates)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print("| weights | lambda | alignment (weight, tau, grid) | mean MRR | " + " | ".join(
        f"{g}: R@1 / R@10 / MRR / DICE@10 / C@100 / C@200" for g in rows[0]["sets"]) + " |")
    for row in rows:
        a = row["alignment"]
        cells = [f"{s['recall@1']:.3f} / {s['recall@10']:.3f} / {s['mrr']:.3f} / {s['dice@10']:.1f} / {s['candidates@100']:.3f} / "
                 f"{s['candidates@200']:.3f}" for s in row["sets"].values()]
        print(f"| {row['weights']} | {row['lambda']:g} | {a['weight']:g}, {a['tau']:g}, {a['grid']} | {row['mean_mrr']:.3f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
