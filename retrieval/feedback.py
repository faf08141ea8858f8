"""Relevance feedback measured with a simulated user, and its coefficients chosen on validation.

Protocol. The archive is every image of the dataset; the queries are `evaluate`'s simulated
free-hand sketches of the split's images (`retrieval.evaluate.make_queries`), searched as `search`
does (fused vector, top `candidates` re-ranked by the DICE of S's masks and the sketch aligned to
their contours, `retrieval.align`, with the search's defaults). After each round the
user looks at the top 10 and likes the `liked` hits whose ground-truth mask is closest to the
target's (DICE of the dataset's masks), dislikes the `disliked` farthest, and the next round
searches with the sketch and everything liked and disliked so far (`retrieval.relevance.Rocchio`),
as `search SKETCH --like ... --unlike ...` does. Reported after 0, 1, 2, ... rounds:
    recall@10  the target image is in the top 10
    dice@10    anatomical relevance: the mean ground-truth DICE (percent) between each top-10 hit
               and the target

    python -m retrieval.feedback --data DATA --bundle BUNDLE [--split test] [--choose-on val]
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.images import tensor_to_images
from retrieval.align import Alignment, aligned_distances, alignment_scores, final_score
from retrieval.defaults import DEFAULT_LAMBDA
from retrieval.evaluate import EvaluationOptions, embed_archive, make_queries
from retrieval.models import SystemModels
from retrieval.relevance import Rocchio
from retrieval.rerank import dice_score
from retrieval.vector import bundle_recipe, fuse_vectors, sketch_field

TOP = 10
# The coefficients tried when choosing on validation (a = 1: only the ratios matter after renormalising)
LIKED_GRID = (0.25, 0.5, 0.75, 1.0, 1.5)
DISLIKED_GRID = (0.0, 0.15, 0.3, 0.6, 1.0, 1.5)


@dataclass
class FeedbackOptions:
    rounds: int = 2
    liked: int = 3  # hits liked per round: the best of the top 10 by ground-truth DICE with the target
    disliked: int = 3  # hits disliked per round: the worst of the top 10
    strengths: tuple[float, ...] = (0.0, 0.5, 1.0)
    seeds: tuple[int, ...] = (0,)
    candidates: int = 100
    lam: float = DEFAULT_LAMBDA
    limit: int | None = None  # only the first `limit` images of the split
    batch: int = 16
    alignment: Alignment | None = field(default_factory=Alignment)  # None: re-rank by similarity and DICE alone


@dataclass
class PreparedQueries:
    """A split's queries with everything the simulation needs, computed once."""

    target: np.ndarray  # (Q,) archive index of each query's image
    vectors: np.ndarray  # float32 (Q, D) the sketches' fused vectors
    dice: np.ndarray  # (Q, N) DICE (percent) of S(x_hat) with each archive image's S masks: the re-ranking
    relevance: np.ndarray  # (Q, N) ground-truth DICE (percent) of the target with each archive image
    sketches: np.ndarray | None = None  # uint8 (Q, R, R) the normalised sketches, for the alignment; None: no alignment
    archive_labels: np.ndarray | None = None  # uint8 (N, R, R) S's masks of the archive, the contours aligned to
    # Aligned chamfer distances already computed, per query {archive index: pixels}: the rounds and
    # the coefficients tried share most candidates, and the alignment is the costly part
    aligned: dict[int, dict[int, float]] = field(default_factory=dict)

    def alignment(self, q: int, candidates: np.ndarray, alignment: Alignment | None) -> np.ndarray | None:
        """exp(-d / tau) of query q's sketch aligned to the candidates' contours; None without alignment."""
        if alignment is None or self.sketches is None or self.archive_labels is None:
            return None
        known = self.aligned.setdefault(q, {})
        missing = [int(i) for i in candidates if int(i) not in known]
        if missing:
            known.update(zip(missing, aligned_distances(self.sketches[q], self.archive_labels[missing], alignment).tolist()))
        return alignment_scores(np.array([known[int(i)] for i in candidates]), alignment.tau)


@torch.no_grad()
def prepare(models: SystemModels, dataset: ImageDataset, archive_labels: np.ndarray, truth: np.ndarray, split: str,
            options: FeedbackOptions, progress: Callable[[str, int, int], None]) -> PreparedQueries:
    """Generate and embed the split's simulated sketches once; the rounds only move vectors."""
    names = {sample.name for sample in ImageDataset(dataset.root, split).samples}
    indices = [i for i, sample in enumerate(dataset.samples) if sample.name in names][: options.limit]
    queries, _ = make_queries(dataset, indices, models.resolution,
                              EvaluationOptions(strengths=options.strengths, seeds=options.seeds), archive_labels)  # fmt: skip
    if not queries.target:
        raise InputError(f"{dataset.root}: no query could be drawn for split {split!r} (no structures in its masks)")
    classes = max(models.label_classes, int(truth.max()) + 1)
    vectors, dice = [], []
    for start in range(0, len(queries.target), options.batch):
        sketches = np.stack(queries.sketches[start : start + options.batch])
        result = models.sketch2medi.generate(sketches)
        images = result.steps[-1]
        vectors.append(fuse_vectors(sketch_field(sketches), result.w - models.code_mean.cpu(), models.C.embed(images).cpu(), bundle_recipe(models)))
        for labels in models.S.predict_label_map(list(tensor_to_images(images))):
            dice.append([dice_score(labels, stored, models.label_classes) for stored in archive_labels])
        progress("queries", min(start + options.batch, len(queries.target)), len(queries.target))
    relevance = {t: [dice_score(truth[t], other, classes) for other in truth] for t in set(queries.target)}
    return PreparedQueries(np.array(queries.target), np.concatenate(vectors), np.array(dice), np.array([relevance[t] for t in queries.target]),
                           np.stack(queries.sketches), archive_labels)


def simulate(archive: np.ndarray, queries: PreparedQueries, feedback: Rocchio, options: FeedbackOptions) -> list[dict[str, float]]:
    """Per round (0 = no feedback): recall@10 and dice@10 over the queries."""
    found = np.zeros((options.rounds + 1, len(queries.target)))
    relevant = np.zeros_like(found)
    for q, (target, vector) in enumerate(zip(queries.target, queries.vectors)):
        liked: list[int] = []
        disliked: list[int] = []
        for round_ in range(options.rounds + 1):
            moved = feedback.move(vector, archive[liked], archive[disliked]) if round_ else vector
            similarity = archive @ moved
            candidates = np.argsort(-similarity, kind="stable")[: options.candidates]
            aligned = queries.alignment(q, candidates, options.alignment)
            scores = final_score(similarity[candidates], queries.dice[q, candidates], options.lam, aligned,
                                 0.0 if options.alignment is None else options.alignment.weight)
            top = candidates[np.argsort(-scores, kind="stable")][:TOP]
            found[round_, q], relevant[round_, q] = target in top, queries.relevance[q, top].mean()
            judged = top[np.argsort(-queries.relevance[q, top], kind="stable")]
            liked += [int(i) for i in judged[: options.liked] if i not in liked and i not in disliked]
            disliked += [int(i) for i in judged[len(judged) - options.disliked :] if i not in liked and i not in disliked]
    return [{"round": r, "recall@10": round(float(found[r].mean()), 4), "dice@10": round(float(relevant[r].mean()), 2)}
            for r in range(options.rounds + 1)]  # fmt: skip


def choose(archive: np.ndarray, queries: PreparedQueries, options: FeedbackOptions) -> tuple[Rocchio, list[dict]]:
    """The grid's coefficients with the best recall@10 after the last round (then dice@10), and every trial."""
    trials = []
    for liked, disliked in itertools.product(LIKED_GRID, DISLIKED_GRID):
        final = simulate(archive, queries, Rocchio(1.0, liked, disliked), options)[-1]
        trials.append({"liked": liked, "disliked": disliked, "recall@10": final["recall@10"], "dice@10": final["dice@10"]})
    best = max(trials, key=lambda t: (t["recall@10"], t["dice@10"]))
    return Rocchio(1.0, best["liked"], best["disliked"]), trials


def evaluate_feedback(data: str | Path, bundle: str | Path | None = None, split: str = "test", choose_on: str | None = None,
                      options: FeedbackOptions | None = None, device: str = "auto",
                      progress: Callable[[str, int, int], None] | None = None) -> dict:  # fmt: skip
    """The module docstring's protocol; with `choose_on`, the coefficients are first chosen on that split."""
    options = options or FeedbackOptions()
    progress = progress or (lambda stage, done, total: None)
    models = SystemModels(bundle, device)
    dataset = ImageDataset(data)
    if not dataset.has_masks:
        raise InputError(f"{data}: the simulated user judges hits by the ground-truth masks, and some are missing")
    archive = embed_archive(models, dataset, EvaluationOptions(batch=options.batch), progress)  # the bundle's vector weights, as the queries
    truth = np.stack([dataset.mask(i, models.resolution) for i in range(len(dataset))])
    vectors = archive.fused.numpy()
    report: dict = {"data": str(data), "bundle": str(models.bundle), "split": split, "archive_images": len(dataset),
                    "options": asdict(options)}  # fmt: skip
    feedback = Rocchio()
    if choose_on is not None:
        validation = prepare(models, dataset, archive.labels, truth, choose_on, options, progress)
        feedback, trials = choose(vectors, validation, options)
        report.update(chosen_on=choose_on, trials=trials, validation_rounds=simulate(vectors, validation, feedback, options))
    queries = prepare(models, dataset, archive.labels, truth, split, options, progress)
    report.update(coefficients=vars(feedback), queries=len(queries.target), rounds=simulate(vectors, queries, feedback, options))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval.feedback", description="Relevance feedback with a simulated user.")
    parser.add_argument("--data", required=True, help="dataset folder (images/, masks/, split.csv)")
    parser.add_argument("--bundle", default=None, help="bundle folder")
    parser.add_argument("--split", default="test", help="the split whose images are the queries")
    parser.add_argument("--choose-on", default=None, help="choose the coefficients on this split first (e.g. val)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--no-align", action="store_true", help="re-rank by similarity and DICE alone, without the alignment")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    options = FeedbackOptions(rounds=args.rounds, limit=args.limit, alignment=None if args.no_align else Alignment())
    try:
        report = evaluate_feedback(args.data, args.bundle, args.split, args.choose_on, options,
                                   args.device, lambda stage, done, total: print(f"{stage} {done}/{total}", end="\r", flush=True))  # fmt: skip
    except InputError as error:
        raise SystemExit(f"error: {error}")
    print()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"coefficients: {report['coefficients']}")
    print("| round | recall@10 | DICE@10 |\n| --- | --- | --- |")
    for row in report["rounds"]:
        print(f"| {row['round']} | {row['recall@10']:.3f} | {row['dice@10']:.1f} |")


if __name__ == "__main__":
    main()
