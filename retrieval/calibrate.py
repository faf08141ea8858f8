"""Fit and measure a bundle's match-quality calibration (`retrieval.quality`).

Fitting queries, searched as `search` does (fused vector, top candidates re-ranked by DICE and the
aligned sketch) against an archive of every image of `--data`:
    in domain      the split's images drawn by `evaluate`'s free-hand simulator at strengths 0, 1, 2;
                   each of the top TOP hits labelled by the ground truth: the sketched image, or a
                   mask DICE >= CLOSE_DICE percent with it, is a close match
    out of domain  the same simulator's sketches of a phantom dataset (`--phantom`: another anatomy)
                   and random scribbles (`--scribble-seed`): no hit is a close match
The quality model (`retrieval.quality`) is two logistic regressions, fitted by Newton's method with
a small L2 penalty on standardised features: P(close | in domain) of the in-domain queries' hits'
features (`HIT_FEATURES`), and P(in domain) of every query's domain logit (the `DomainGate`). Where
the bundle has no sketch-domain classifier there is no gate, and the hit model is fitted on the
out-of-domain queries' hits too. The threshold is the largest best-hit quality
that leaves at most `--in-domain-rate` (default 5 %) of the in-domain fitting queries below it: the
most out-of-domain queries flagged for that rate.

    python -m retrieval.calibrate fit --data DATA --split val --bundle BUNDLE --phantom PHANTOM [--scribble-seed 1]
    python -m retrieval.calibrate measure --data DATA --split test --bundle BUNDLE --phantom PHANTOM [--scribble-seed 0] [--sketches DRAWN]

`fit` writes BUNDLE/calibration.json; `measure` reports, per query set, the share of queries whose
best hit is below the threshold ("no close match").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.images import file_sha256, tensor_to_images
from generation.sketch import draw_strokes
from retrieval.defaults import DEFAULT_LAMBDA
from retrieval.evaluate import (
    Archive,
    EvaluationOptions,
    GroundTruth,
    Queries,
    drawn_queries,
    embed_archive,
    make_queries,
    rerank_order,
    with_bundle_recipe,
)
from retrieval.metrics import dice_matrix
from retrieval.models import SystemModels
from retrieval.quality import CALIBRATION_FILE, DOMAIN_FILE, FEATURES, HIT_FEATURES, Calibration, DomainGate, hit_features, load_calibration
from retrieval.rerank import dice_score
from retrieval.search import load_sketch, vector_part_sizes
from retrieval.vector import VectorRecipe, fuse_vectors, sketch_field

CLOSE_DICE = 50.0  # percent: ground-truth DICE at which a hit counts as a close match
TOP = 10  # hits per fitting query
STRENGTHS = (0.0, 1.0, 2.0)
SCRIBBLES = 200  # scribble queries per seed
SCRIBBLE_SIZE = 256  # drawn like the drawn-from-memory sketches: a 256 px canvas, 3 px lines
L2 = 1e-3  # ridge penalty per hit on the standardised weights


def fit_logistic(features: np.ndarray, close: np.ndarray, l2: float = L2, iterations: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Logistic regression by Newton's method on standardised features -> (mean, scale, weights, bias)."""
    assert features.ndim == 2 and len(features) == len(close), (features.shape, close.shape)
    mean, scale = features.mean(axis=0), features.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    x = np.concatenate([np.ones((len(features), 1)), (features - mean) / scale], axis=1)
    y = close.astype(np.float64)
    theta = np.zeros(x.shape[1])
    penalty = np.diag([0.0] + [l2 * len(x)] * features.shape[1])  # the bias is not penalised
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-x @ theta))
        gradient = x.T @ (p - y) + penalty @ theta
        hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return mean, scale, theta[1:], float(theta[0])


def choose_threshold(in_domain_best: np.ndarray, rate: float) -> float:
    """The largest threshold leaving at most `rate` of `in_domain_best` strictly below it."""
    values = np.sort(in_domain_best)
    allowed = int(math.floor(rate * len(values)))  # how many may be flagged
    if allowed >= len(values):
        return 1.0
    return float(values[allowed])


def scribble(rng: np.random.Generator, size: int = SCRIBBLE_SIZE) -> np.ndarray:
    """Random strokes, uint8 (size, size) black on white: 2 to 6 smooth curves wandering across the
    canvas, in the 3 px lines of the drawn sketches; no anatomy."""
    strokes = []
    for _ in range(int(rng.integers(2, 7))):
        steps = int(rng.integers(8, 40))
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, steps))
        step = rng.uniform(0.01, 0.03) * size
        start = rng.uniform(0.1, 0.9, 2) * size
        points = start + np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * step, axis=0)
        strokes.append(np.clip(np.concatenate([start[None], points]), 0, size - 1))
    return draw_strokes(strokes, size, size, line=3)


def scribble_queries(seed: int, count: int, resolution: int) -> Queries:
    rng = np.random.default_rng([seed, 7919])
    queries = Queries()
    while len(queries.sketches) < count:
        try:
            queries.sketches.append(load_sketch(scribble(rng), resolution))
        except InputError:  # a scribble normalisation refuses (e.g. one that fills the canvas): draw another
            continue
        queries.target.append(-1)
        queries.group.append("scribble")
    return queries


@dataclass
class HitTable:
    """The top TOP hits of every query of one query set."""

    name: str
    features: np.ndarray  # (Q, TOP, len(FEATURES))
    close: np.ndarray | None  # bool (Q, TOP); None out of domain (nothing is close)
    first: np.ndarray | None  # bool (Q,): the sketched image ranked first; None out of domain


@torch.no_grad()
def collect(models: SystemModels, archive: Archive, truth: GroundTruth | None, queries: Queries, name: str,
            options: EvaluationOptions, progress: Callable[[str, int, int], None]) -> HitTable:
    """Search every query as `search` does, in `evaluate`'s order of its `full` method (fused vector,
    top candidates re-ranked by DICE and the sketch aligned to their contours), and keep the
    features of its top TOP hits; `truth` labels them (None: out of domain)."""
    sizes, code_mean, classes = vector_part_sizes(models), models.code_mean.cpu(), models.label_classes
    archive_vectors = archive.fused.numpy()
    features, close, first = [], [], []
    for start in range(0, len(queries.sketches), options.batch):
        sketches = np.stack(queries.sketches[start : start + options.batch])
        result = models.sketch2medi.generate(sketches)
        images = result.steps[-1]
        embeddings = F.normalize(models.C.embed(images.to(models.device)), dim=1).cpu()
        labels = models.S.predict_label_map(list(tensor_to_images(images)))
        vectors = fuse_vectors(sketch_field(sketches), result.w.cpu() - code_mean, embeddings, options.recipe)
        domains = models.domain_logits(sketches)
        for row, vector in enumerate(vectors):
            hits = rerank_order(archive_vectors @ vector, labels[row], archive.labels, options.candidates, options.lam, classes,
                                sketches[row], options.alignment)[:TOP]
            dice = np.array([dice_score(labels[row], archive.labels[i], classes) for i in hits])
            features.append(hit_features(vector, archive_vectors[hits], dice, sizes, None if domains is None else domains[row]))
            if truth is not None:
                target = queries.target[start + row]
                close.append((truth.relevance[target][hits] >= CLOSE_DICE) | (hits == target))
                first.append(hits[0] == target)
        progress(name, min(start + options.batch, len(queries.sketches)), len(queries.sketches))
    return HitTable(name, np.stack(features), None if truth is None else np.stack(close), None if truth is None else np.array(first))


def ground_truth(dataset: ImageDataset, resolution: int, targets: list[int], classes: int) -> GroundTruth:
    """`evaluate`'s ground truth of a dataset with masks, without its oracle (not needed here)."""
    labels = np.stack([dataset.mask(i, resolution) for i in range(len(dataset))]).astype(np.uint8)
    images = sorted(set(targets))
    rows = np.nan_to_num(dice_matrix(labels[images], labels, classes))  # NaN (nothing on either side) -> 0, as dice_score
    return GroundTruth(labels, None, dict(zip(images, rows)))


@dataclass
class QuerySets:
    """The fitting or measuring queries: archive, ground truth and one HitTable per query set."""

    models: SystemModels
    tables: list[HitTable]
    archive_images: int


def query_sets(models: SystemModels, data: str | Path, split: str, phantom: str | Path | None, scribble_seed: int | None,
               sketches: str | Path | None, options: EvaluationOptions, progress: Callable[[str, int, int], None],
               scribbles: int = SCRIBBLES) -> QuerySets:
    """Search `split`'s simulated sketches at STRENGTHS (one HitTable per strength), the drawn
    `sketches`, the phantom's simulated sketches and the scribbles against every image of `data`."""
    dataset = ImageDataset(data)
    if not dataset.has_masks:
        raise InputError(f"{data}: close matches are judged by the ground-truth masks, and some are missing")
    split_names = {sample.name for sample in ImageDataset(data, split).samples}
    split_indices = [i for i, sample in enumerate(dataset.samples) if sample.name in split_names][: options.limit]
    drawn = drawn_queries(dataset, sketches, models.resolution) if sketches else None
    phantom_set = ImageDataset(phantom) if phantom else None
    if phantom_set is not None and not phantom_set.has_masks:
        raise InputError(f"{phantom}: its sketches are drawn from its masks, and some are missing; make it with `phantom`")
    archive = embed_archive(models, dataset, options, progress)
    in_domain, _ = make_queries(dataset, split_indices, models.resolution, options, archive.labels)
    targets = in_domain.target + (drawn.target if drawn else [])
    truth = ground_truth(dataset, models.resolution, targets, max(models.label_classes, dataset.num_classes))
    tables = []
    for strength in options.strengths:
        chosen = [i for i, g in enumerate(in_domain.group) if g == f"{strength:g}"]
        subset = Queries([in_domain.target[i] for i in chosen], [in_domain.group[i] for i in chosen], [in_domain.sketches[i] for i in chosen])
        tables.append(collect(models, archive, truth, subset, f"{split} strength {strength:g}", options, progress))
    if drawn is not None:
        tables.append(collect(models, archive, truth, drawn, "drawn", options, progress))
    if phantom_set is not None:
        indices = list(range(len(phantom_set)))[: options.limit]
        phantom_queries, _ = make_queries(phantom_set, indices, models.resolution, options, np.zeros((len(phantom_set), 1, 1), np.uint8))
        tables.append(collect(models, archive, None, phantom_queries, "phantom", options, progress))
    if scribble_seed is not None:
        tables.append(collect(models, archive, None, scribble_queries(scribble_seed, scribbles, models.resolution), "scribbles", options, progress))
    return QuerySets(models, tables, len(dataset))


def best_quality(calibration: Calibration, table: HitTable) -> np.ndarray:
    """(Q,) the quality of each query's best (first) hit."""
    return calibration.quality(table.features[:, 0])


def rates(calibration: Calibration, tables: list[HitTable]) -> list[dict]:
    """Per query set: queries, the share that says "no close match", and for in-domain sets the
    share whose best hit is a close match and how well quality predicts closeness."""
    rows = []
    for table in tables:
        best = best_quality(calibration, table)
        row = {"queries": len(best), "domain": "in" if table.close is not None else "out",
               "no_close_match": float(np.mean(best < calibration.threshold)), "mean_best_quality": float(best.mean())}
        if table.close is not None:
            quality = calibration.quality(table.features.reshape(-1, len(FEATURES)))
            row.update(best_close=float(table.close[:, 0].mean()), first_is_sketched=float(table.first.mean()),
                       hit_close=float(table.close.mean()), hit_quality=float(quality.mean()))
        rows.append({"set": table.name, **row})
    return rows


def fit(data: str | Path, split: str, bundle: str | Path | None, phantom: str | Path, scribble_seed: int, in_domain_rate: float = 0.05,
        options: EvaluationOptions | None = None, device: str = "auto", command: str = "",
        progress: Callable[[str, int, int], None] | None = None, scribbles: int = SCRIBBLES) -> tuple[Calibration, list[dict]]:
    """Fit the quality model and the threshold on the module docstring's queries; returns them and
    the rates on the fitting queries (not saved: the caller saves)."""
    options = options or EvaluationOptions(strengths=STRENGTHS, seeds=(0,))
    if not 0 <= in_domain_rate < 1:
        raise InputError(f"in-domain rate {in_domain_rate}: must be in [0, 1), e.g. 0.05")
    models = SystemModels(bundle, device)
    options = with_bundle_recipe(options, models)
    sets = query_sets(models, data, split, phantom, scribble_seed, None, options, progress or (lambda *_: None), scribbles)
    logits = np.concatenate([t.features[:, 0, FEATURES.index("domain")] for t in sets.tables])
    gated = not np.isnan(logits).any()  # the bundle has a sketch-domain classifier
    # With the gate, the hit model learns closeness among in-domain hits; without it, out-of-domain
    # hits (never close) are all it has to learn what no close match looks like.
    hit_sets = [t for t in sets.tables if t.close is not None or not gated]
    features = np.concatenate([t.features.reshape(-1, len(FEATURES)) for t in hit_sets])[:, : len(HIT_FEATURES)]
    close = np.concatenate([(t.close if t.close is not None else np.zeros(t.features.shape[:2], bool)).reshape(-1) for t in hit_sets])
    present = ~np.isnan(features).all(axis=0)  # a vector part of weight 0 is left out of the model
    if not present.any() or np.isnan(features[:, present]).any():
        raise InputError("the fitting queries' hits lack a feature for some hits only; fit with re-ranking and the workspace's vector weights")
    mean, scale, weights, bias = fit_logistic(features[:, present], close)
    used = tuple(name for name, kept in zip(HIT_FEATURES, present) if kept)
    calibration = Calibration(sets.models.bundle_id, mean, scale, weights, bias, 1.0, CLOSE_DICE, features=used)
    if gated:
        drawn_in_domain = np.concatenate([np.full(len(t.features), t.close is not None) for t in sets.tables])
        gate_mean, gate_scale, gate_weight, gate_bias = fit_logistic(logits[:, None], drawn_in_domain)
        weight = float(gate_weight[0] / gate_scale[0])  # un-standardised: bias + weight * logit
        calibration.domain = DomainGate(weight, float(gate_bias - weight * gate_mean[0]), file_sha256(sets.models.bundle / DOMAIN_FILE))
    in_domain_best = np.concatenate([best_quality(calibration, t) for t in sets.tables if t.close is not None])
    calibration.threshold = choose_threshold(in_domain_best, in_domain_rate)
    calibration.fitted_on = {"bundle": str(sets.models.bundle), "data": str(data), "split": split, "phantom": str(phantom), "scribble_seed": scribble_seed,
                             "scribbles": scribbles, "strengths": list(options.strengths), "seeds": list(options.seeds), "limit": options.limit,
                             "vector_weights": options.recipe.tag, "lambda": options.lam, "candidates": options.candidates,
                             "top": TOP, "in_domain_rate": in_domain_rate, "hits": int(len(close)), "close_hits": int(close.sum()),
                             "command": command}  # fmt: skip
    return calibration, rates(calibration, sets.tables)


def measure(data: str | Path, split: str, bundle: str | Path | None, phantom: str | Path | None, scribble_seed: int | None,
            sketches: str | Path | None, options: EvaluationOptions | None = None, device: str = "auto",
            progress: Callable[[str, int, int], None] | None = None, scribbles: int = SCRIBBLES) -> dict:
    """The rate of "no close match" per query set with the bundle's calibration, read once the
    queries are searched (a damaged or mismatched one is refused at once)."""
    options = options or EvaluationOptions(strengths=STRENGTHS, seeds=(0,))
    models = SystemModels(bundle, device)
    options = with_bundle_recipe(options, models)
    load_calibration(models.bundle, models.bundle_id)
    sets = query_sets(models, data, split, phantom, scribble_seed, sketches, options, progress or (lambda *_: None), scribbles)
    calibration = load_calibration(models.bundle, models.bundle_id)
    if calibration is None:
        raise InputError(f"{models.bundle}: has no {CALIBRATION_FILE}; fit one with `python -m retrieval.calibrate fit`")
    return {"data": str(data), "split": split, "bundle": str(models.bundle), "bundle_id": models.bundle_id,
            "archive_images": sets.archive_images, "threshold": calibration.threshold, "phantom": None if phantom is None else str(phantom),
            "scribble_seed": scribble_seed, "scribbles": scribbles, "sketches": None if sketches is None else str(sketches),
            "options": {"strengths": list(options.strengths), "seeds": list(options.seeds), "limit": options.limit},
            "rates": rates(calibration, sets.tables)}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    lines = ["| query set | domain | queries | no close match | best hit close | sketched image first | mean best quality |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        close = f"{r['best_close']:.3f}" if "best_close" in r else "-"
        first = f"{r['first_is_sketched']:.3f}" if "first_is_sketched" in r else "-"
        lines.append(f"| {r['set']} | {r['domain']} | {r['queries']} | {r['no_close_match']:.3f} | {close} | {first} | {r['mean_best_quality']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrieval.calibrate", description="Fit or measure the match-quality calibration of a bundle.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    for verb in ("fit", "measure"):
        sub = verbs.add_parser(verb)
        sub.add_argument("--data", required=True, help="dataset folder (images/, masks/, split.csv); every image is the archive")
        sub.add_argument("--split", default="val" if verb == "fit" else "test", help="the split whose images are sketched")
        sub.add_argument("--bundle", default=None, help="bundle folder (calibration.json is written / read there)")
        sub.add_argument("--phantom", default=None, required=verb == "fit", help="a phantom dataset: out-of-domain sketches")
        sub.add_argument("--scribble-seed", type=int, default=1 if verb == "fit" else 0, help="seed of the random scribbles")
        sub.add_argument("--seeds", default="0", help="simulator seeds, comma-separated")
        sub.add_argument("--scribbles", type=int, default=SCRIBBLES, help="how many scribbles")
        sub.add_argument("--limit", type=int, default=None, help="only the first N images of the split and of the phantom")
        sub.add_argument("--weights", default=None, help="vector weights sketch=A,code=B,image=C (default: the index default)")
        sub.add_argument("--lambda", dest="lam", type=float, default=DEFAULT_LAMBDA)
        sub.add_argument("--device", default="auto")
        sub.add_argument("--json", type=Path, default=None, help="also write the report here")
    verbs.choices["fit"].add_argument("--in-domain-rate", type=float, default=0.05, help="share of in-domain queries allowed below the threshold")
    verbs.choices["measure"].add_argument("--sketches", default=None, help="a folder of drawn sketches (sketches/NAME.png)")
    args = parser.parse_args(argv)
    progress = lambda stage, done, total: print(f"{stage} {done}/{total}   ", end="\r", file=sys.stderr, flush=True)  # noqa: E731
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise SystemExit(f"error: --seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1")
    try:
        recipe = VectorRecipe.parse(args.weights) if args.weights else None  # None: the bundle's
        options = EvaluationOptions(strengths=STRENGTHS, seeds=seeds, lam=args.lam, recipe=recipe, limit=args.limit)
        if args.verb == "fit":
            command = "python -m retrieval.calibrate " + " ".join(argv if argv is not None else sys.argv[1:])
            calibration, report_rates = fit(args.data, args.split, args.bundle, args.phantom, args.scribble_seed, args.in_domain_rate,
                                            options, args.device, command, progress, args.scribbles)  # fmt: skip
            path = calibration.save(calibration.fitted_on["bundle"])
            report = {**calibration.to_json(), "rates": report_rates, "written": str(path)}
        else:
            report = measure(args.data, args.split, args.bundle, args.phantom, args.scribble_seed, args.sketches, options, args.device,
                             progress, args.scribbles)
            report_rates = report["rates"]
    except InputError as error:
        raise SystemExit(f"error: {error}")
    print(file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(f"threshold {report['threshold']:.4f}")
    print(markdown(report_rates))


if __name__ == "__main__":
    main()
