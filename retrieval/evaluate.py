"""`evaluate`: how well sketches find their image, for the system, its ablations and baselines,
and how good the generated images are (the paper's Table I), on one dataset split.

Protocol. The archive is every image of the dataset. For each image of the split, simulated
free-hand sketches (`generation.freehand`, drawn at 256 px from the image's mask, then normalised as
a user's sketch is) at each strength and seed are the queries; that image is the one right answer.
Masks are the dataset's own when it has them (as a person would draw the true anatomy), else S's.
Or the queries are drawn sketches (`EvaluationOptions.sketches`): a folder with `sketches/NAME.png`,
each a drawing of the dataset's image NAME.png (see `drawn_queries`); they are reported as "drawn".

Metrics per method and query set: Recall@1/5/10, MRR and median rank of the right answer, and the
anatomical relevance DICE@10: the mean DICE (percent) between the ground-truth masks (as for the
queries: the dataset's, else S's) of the top 10 and those of the query's image. It does not punish
returning a neighbouring frame of a video, only anatomy unlike the query's. Recall@100 and @200
of `no_rerank` are the first stage's candidate recall: how often the re-ranking can find the image.

Methods, all on the same queries and the same archive vectors:
    full         E, G, H (T steps) -> fused vector (sketch field, E's code, C(x_hat)) -> top candidates
                 -> re-rank by DICE and the sketch aligned to S's mask contours, as `search` does
    no_refiner   the same with x_0 = G(E(sketch)) (no H)
    no_align     full without the alignment (re-ranked by similarity and DICE alone)
    no_rerank    full without any re-ranking (the first stage's order)
    w_only       E's code alone (cosine of offsets from E's mean code)
    image_only   C(x_hat) alone
    sketch_only  no generator: the sketch field alone (the query's against each archive image's
                 synthesized sketch; a soft chamfer match that needs no training)
    chamfer      no generator: symmetric chamfer distance between the query and each archive image's
                 synthesized sketch (the classic sketch-to-sketch match, exhaustive)
    pix2pix      pix2pix's image instead of Sketch2MedI's in the fused vector (sketch field and C's
                 embedding; pix2pix has no latent code, so E's part is left out) and for the DICE
                 re-rank (needs `train pix2pix` in the bundle)
    cyclegan, unit, ugatit   the same with the unpaired baselines' images (CycleGAN, UNIT,
                 U-GAT-IT; each needs its `train NAME` in the bundle)
    full_labelled  full, then the class match of the labelled sketch (`retrieval.labelled`): the same
                 simulated sketch with each stroke in its class's colour (the simulator knows which
                 class of the mask it outlines), decoded as an uploaded colour-coded sketch
                 (`EvaluationOptions.labelled`; one row per weighting, named full_labelled[weight=..,dice=..]
                 when there are several)
References, to read the others against:
    oracle       the query against each archive image's contours drawn from its ground-truth masks, by
                 symmetric chamfer after the best similarity transform (`retrieval.oracle`): what a
                 perfect synthesizer plus alignment could reach (needs the dataset's masks)
    random       a random order (seeded per query): the chance level of every metric
    best         the archive ordered by DICE to the query image's masks: the highest DICE@10 any
                 ranking can reach
Ranks are over the whole archive: re-ranked candidates first, the rest in similarity order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.freehand import freehand_labelled_sketch
from generation.images import find_images, square_resize, tensor_to_images
from generation.labelled import LabelledSketch, colour_coded, decode_labelled_sketch
from generation.registry import load_network, network_exists
from generation.sketch import INK, PAPER, sketch_from_mask, sketch_to_tensor
from retrieval.align import Alignment, aligned_distances, alignment_scores, final_score
from retrieval.defaults import DEFAULT_CANDIDATES, DEFAULT_LAMBDA
from retrieval.labelled import LabelWeights, class_fields, class_match, labelled_scores
from retrieval.metrics import dice_matrix, fd_c, kid_c
from retrieval.models import SystemModels
from retrieval.oracle import AlignedChamfer
from retrieval.perceptual import lpips_unavailable_reason, perceptual_distance
from retrieval.rerank import dice_score
from retrieval.search import load_sketch
from retrieval.vector import ArchiveParts, VectorRecipe, archive_parts, bundle_recipe, fuse_vectors, sketch_field

BASELINES = ("pix2pix", "cyclegan", "unit", "ugatit")  # sketch -> image translators, each present when trained into the bundle
METHODS = ("full", "no_refiner", "no_align", "no_rerank", "w_only", "image_only", "sketch_only", "chamfer", *BASELINES,
           "oracle", "random", "best")
LABELLED = "full_labelled"  # the rows of `EvaluationOptions.labelled`
SKETCH_SIZE = 256  # simulated free-hand sketches are drawn at this size, then normalised
DRAWN = "drawn"  # the query set of drawn sketches, in place of a strength
RELEVANCE_DEPTH = 10  # DICE@10
RANDOM_SEED = 20240601  # the `random` row's orders, the same on every run


@dataclass
class EvaluationOptions:
    strengths: tuple[float, ...] = (0.0, 1.0, 2.0)
    seeds: tuple[int, ...] = (0, 1)
    candidates: int = DEFAULT_CANDIDATES
    lam: float = DEFAULT_LAMBDA
    alignment: Alignment | None = field(default_factory=Alignment)  # None: re-rank by similarity and DICE alone
    recipe: VectorRecipe | None = None  # None: the bundle's (`retrieval.vector.bundle_recipe`), as `index` uses
    limit: int | None = None  # evaluate only the first `limit` images of the split
    batch: int = 16
    sketches: str | None = None  # a folder of drawn sketches (sketches/NAME.png) to query with instead
    labelled: tuple[LabelWeights, ...] = ()  # a full_labelled row per weighting (simulated queries only)
    methods: tuple[str, ...] | None = None  # only these rows (None: all); full_labelled rows come with `labelled`
    precision: str = "float32"  # of S and C on the archive, as `index --precision` (`SystemModels`)
    compile_archive: bool = False  # S and C compiled for the archive, as `index --compile` (`SystemModels.compile_archive`)

    def labelled_rows(self) -> dict[str, LabelWeights]:
        if len(self.labelled) == 1:
            return {LABELLED: self.labelled[0]}
        return {f"{LABELLED}[{weights.tag}]": weights for weights in self.labelled}

    def wants(self, method: str) -> bool:
        return self.methods is None or method in self.methods


@dataclass
class Queries:
    target: list[int] = field(default_factory=list)  # archive index of the right answer
    group: list[str] = field(default_factory=list)  # the strength ("0", "1", ...) or DRAWN
    sketches: list[np.ndarray] = field(default_factory=list)  # normalised uint8 (R, R)
    labelled: list[LabelledSketch | None] = field(default_factory=list)  # the colour-coded query decoded; None without


def recall_table(ranks: np.ndarray, top_dice: np.ndarray) -> dict[str, float]:
    """ranks: 1-based rank of the right answer per query; top_dice: DICE@10 per query."""
    return {"recall@1": float(np.mean(ranks <= 1)), "recall@5": float(np.mean(ranks <= 5)),
            "recall@10": float(np.mean(ranks <= 10)), "recall@100": float(np.mean(ranks <= 100)),
            "recall@200": float(np.mean(ranks <= 200)), "mrr": float(np.mean(1.0 / ranks)),
            "median_rank": float(np.median(ranks)), "queries": int(len(ranks)), "dice@10": float(np.mean(top_dice))}


def rank_of(target: int, order: np.ndarray) -> int:
    return int(np.nonzero(order == target)[0][0]) + 1


def rerank_order(similarity: np.ndarray, labels: np.ndarray, archive_labels: np.ndarray, candidates: int, lam: float,
                 classes: int, sketch: np.ndarray | None = None, alignment: Alignment | None = None) -> np.ndarray:
    """The archive in final order: the top `candidates` by `search`'s final score (similarity and
    DICE, and with `alignment` the query `sketch` aligned to their mask contours), then the rest."""
    order, scores = candidate_scores(similarity, labels, archive_labels, candidates, lam, classes, sketch, alignment)
    top = order[:candidates]
    return np.concatenate([top[np.argsort(-scores, kind="stable")], order[candidates:]])


def candidate_scores(similarity: np.ndarray, labels: np.ndarray, archive_labels: np.ndarray, candidates: int, lam: float,
                     classes: int, sketch: np.ndarray | None = None, alignment: Alignment | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The archive by similarity, and `search`'s final scores of its first `candidates` (see `rerank_order`)."""
    order = np.argsort(-similarity, kind="stable")
    top = order[:candidates]
    dice = np.array([dice_score(labels, archive_labels[i], classes) for i in top])
    aligned = None
    if alignment is not None and sketch is not None:
        aligned = alignment_scores(aligned_distances(sketch, archive_labels[top], alignment), alignment.tau)
    return order, final_score(similarity[top], dice, lam, aligned, 0.0 if alignment is None else alignment.weight)


def chamfer_distances(query: np.ndarray, archive_sketches: np.ndarray, archive_transforms: np.ndarray) -> np.ndarray:
    """Symmetric mean chamfer distance (pixels) from one sketch to every archive sketch."""
    ink = query == INK
    if not ink.any():
        return np.full(len(archive_sketches), np.inf)
    to_archive = archive_transforms[:, ink].mean(axis=1)  # query ink -> nearest archive ink
    query_transform = ndimage.distance_transform_edt(~ink)
    archive_ink = archive_sketches == INK
    counts = archive_ink.sum(axis=(1, 2))
    to_query = (archive_ink * query_transform).sum(axis=(1, 2)) / np.maximum(counts, 1)
    return np.where(counts > 0, (to_archive + to_query) / 2, np.inf)


def make_queries(dataset: ImageDataset, split_indices: list[int], resolution: int, options: EvaluationOptions,
                 fallback_labels: np.ndarray) -> tuple[Queries, int]:
    """Simulated free-hand queries for the split; returns them and how many came out empty."""
    queries, empty = Queries(), 0
    for index in split_indices:
        if dataset.has_masks:
            mask = dataset.mask(index, SKETCH_SIZE)
        else:
            mask = np.asarray(Image.fromarray(fallback_labels[index]).resize((SKETCH_SIZE, SKETCH_SIZE), Image.NEAREST))
        for strength in options.strengths:
            for seed in options.seeds:
                rng = np.random.default_rng([seed, index, round(strength * 1000)])
                drawing, classes = freehand_labelled_sketch(mask, strength, rng)
                try:
                    sketch = load_sketch(drawing, resolution)
                except InputError:  # nothing to draw (an image without structures)
                    empty += 1
                    continue
                queries.target.append(index)
                queries.group.append(f"{strength:g}")
                queries.sketches.append(sketch)
                queries.labelled.append(labelled_query(drawing, classes, sketch) if options.labelled else None)
    return queries, empty


def labelled_query(drawing: np.ndarray, classes: np.ndarray, sketch: np.ndarray) -> LabelledSketch:
    """The simulated drawing in its classes' colours, decoded as an upload is; its canonical sketch
    is the plain query's `sketch` (the colour table keeps the ink of every pixel)."""
    labelled = decode_labelled_sketch(colour_coded(drawing, classes), sketch.shape[0], int(classes.max(initial=0)))
    assert np.array_equal(labelled.sketch, sketch), "a colour-coded sketch must normalise as its black strokes do"
    return labelled


def drawn_queries(dataset: ImageDataset, folder: str | Path, resolution: int, limit: int | None = None) -> Queries:
    """The drawn sketches `folder/sketches/NAME.png` as queries; the right answer is the dataset's image NAME.

    Names are matched without their suffix and may have sub-folders, as the dataset's images do.
    """
    folder = Path(folder)
    root = folder / "sketches"
    if not root.is_dir():
        raise InputError(f"{folder}: no sketches/ folder; pass a folder with sketches/NAME.png, one per image NAME of the dataset")
    paths = find_images(root)[:limit]
    if not paths:
        raise InputError(f"{root}: no sketch images found; add sketches/NAME.png, one per image NAME of the dataset")
    by_name = {Path(sample.name).with_suffix("").as_posix(): i for i, sample in enumerate(dataset.samples)}
    queries = Queries()
    for path in paths:
        name = path.relative_to(root).with_suffix("").as_posix()
        if name not in by_name:
            raise InputError(f"{path}: the dataset {dataset.root} has no image {name}; name each sketch after the image it depicts")
        queries.target.append(by_name[name])
        queries.group.append(DRAWN)
        queries.sketches.append(load_sketch(path, resolution))
        queries.labelled.append(None)
    return queries


@dataclass
class Archive:
    """The archive as indexing sees it, in the form of each method's comparison."""

    parts: list[ArchiveParts]
    pixels: np.ndarray  # uint8 (N, R, R, 3), the images as the networks saw them
    embeddings: torch.Tensor  # (N, De) C(x), unit rows
    codes: torch.Tensor  # (N, w_dim) E's codes as offsets from its mean code, unit rows
    fields: torch.Tensor  # (N, FIELD_GRID**2) sketch fields of S's sketches
    labels: np.ndarray  # uint8 (N, R, R) S's label maps
    sketches: np.ndarray  # uint8 (N, R, R) S's normalised sketches
    transforms: np.ndarray  # float32 (N, R, R) distance to each sketch's nearest ink (chamfer)
    fused: torch.Tensor  # (N, D) the fused vectors of the recipe
    class_fields: torch.Tensor | None = None  # (N, classes, FIELD_GRID**2) fields of each class's contours (labelled rows)


@dataclass
class GroundTruth:
    """What the ground-truth masks say about the archive: the oracle and every answer's relevance."""

    labels: np.ndarray  # uint8 (N, R, R) the dataset's label maps (S's where it has no masks)
    oracle: AlignedChamfer | None  # None when the dataset has no masks
    relevance: dict[int, np.ndarray]  # per query image (archive index): DICE (percent) to every archive image

    @classmethod
    def of_dataset(cls, dataset: ImageDataset, resolution: int, fallback_labels: np.ndarray, targets: list[int],
                   classes: int) -> GroundTruth:
        oracle = None
        if dataset.has_masks:
            labels = np.stack([dataset.mask(i, resolution) for i in range(len(dataset))]).astype(np.uint8)
            oracle = AlignedChamfer(np.stack([truth_outline(dataset.mask(i, SKETCH_SIZE), resolution) for i in range(len(dataset))]))
        else:
            labels = fallback_labels
        images = sorted(set(targets))
        rows = np.nan_to_num(dice_matrix(labels[images], labels, classes))  # NaN (nothing on either side) -> 0, as dice_score
        return cls(labels, oracle, dict(zip(images, rows)))


def truth_outline(mask: np.ndarray, resolution: int) -> np.ndarray:
    """The synthesized sketch of a ground-truth mask, normalised as the queries are; blank paper if empty."""
    try:
        return load_sketch(sketch_from_mask(mask), resolution)
    except InputError:
        return np.full((resolution, resolution), PAPER, np.uint8)


def with_bundle_recipe(options: EvaluationOptions, models: SystemModels) -> EvaluationOptions:
    """`options` with the vector weights a workspace of this bundle is indexed with, unless set."""
    return options if options.recipe is not None else replace(options, recipe=bundle_recipe(models))


def embed_archive(models: SystemModels, archive: ImageDataset, options: EvaluationOptions,
                  progress: Callable[[str, int, int], None]) -> Archive:
    parts, pixels = [], []
    for start in range(0, len(archive), options.batch):
        images = [archive.image(i) for i in range(start, min(start + options.batch, len(archive)))]
        parts.append(archive_parts(models, images))
        pixels.extend(square_resize(image, models.resolution) for image in images)
        progress("archive", start + len(images), len(archive))
    embeddings = F.normalize(torch.cat([p.embeddings for p in parts]), dim=1)
    codes = torch.cat([p.codes for p in parts]) - models.code_mean.cpu()
    fields = torch.cat([p.fields for p in parts])
    sketches = np.concatenate([p.sketches for p in parts])
    fused = torch.from_numpy(fuse_vectors(fields, codes, embeddings, options.recipe or bundle_recipe(models)))
    transforms = np.stack([ndimage.distance_transform_edt(s != INK) if (s == INK).any() else np.full(s.shape, 1e3)
                           for s in sketches]).astype(np.float32)
    return Archive(parts, np.stack(pixels), embeddings, F.normalize(codes, dim=1), fields,
                   np.concatenate([p.labels for p in parts]), sketches, transforms, fused)


@dataclass
class Baseline:
    """A baseline translator (pix2pix, CycleGAN, UNIT, U-GAT-IT) in place of Sketch2MedI. None has a
    latent code: its vector is the recipe's sketch and image parts."""

    network: torch.nn.Module  # `translate(sketch (N, 1, R, R), ink 1) -> images (N, 3, R, R)`
    recipe: VectorRecipe
    archive: torch.Tensor  # (N, D) the archive's vectors with `recipe`

    @classmethod
    def of_bundle(cls, name: str, models: SystemModels, archive: Archive, recipe: VectorRecipe) -> Baseline | None:
        """None when the bundle has no such network (`train NAME`)."""
        if not network_exists(models.bundle, name):
            return None
        network = load_network(name, models.bundle, models.device)
        if network.config.resolution != models.resolution:
            raise InputError(f"{models.bundle}: {name} works at {network.config.resolution} px but the bundle's G at "
                             f"{models.resolution} px; train it with `train {name} --preset cpu` for a like-for-like row")
        baseline_recipe = VectorRecipe(sketch=recipe.sketch, code=0.0, image=recipe.image)
        fused = torch.from_numpy(fuse_vectors(archive.fields, archive.codes, archive.embeddings, baseline_recipe))
        return cls(network, baseline_recipe, fused)


def evaluate(data: str | Path, split: str = "test", bundle: str | Path | None = None, options: EvaluationOptions | None = None,
             device: str = "auto", on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run the protocol of the module docstring; returns a JSON-ready report."""
    options = options or EvaluationOptions()
    models = SystemModels(bundle, device, options.precision)
    if options.compile_archive:
        models.compile_archive(options.batch)
    options = with_bundle_recipe(options, models)
    progress = on_progress or (lambda stage, done, total: None)
    dataset = ImageDataset(data)
    split_names = {sample.name for sample in ImageDataset(data, split).samples}
    split_indices = [i for i, sample in enumerate(dataset.samples) if sample.name in split_names][: options.limit]
    # Drawn sketches are read before the archive is embedded, so a bad folder fails at once.
    drawn = drawn_queries(dataset, options.sketches, models.resolution, options.limit) if options.sketches else None
    archive = embed_archive(models, dataset, options, progress)
    if drawn is not None:
        queries, empty, groups, query_images = drawn, 0, [DRAWN], len(set(drawn.target))
    else:
        queries, empty = make_queries(dataset, split_indices, models.resolution, options, archive.labels)
        groups, query_images = [f"{s:g}" for s in options.strengths], len(split_indices)
    if not queries.target:
        raise InputError(f"{data}: no query could be drawn for split {split!r} (no structures in its masks)")
    classes = max(models.label_classes, dataset.num_classes)
    truth = GroundTruth.of_dataset(dataset, models.resolution, archive.labels, queries.target, classes)
    if options.labelled:
        archive.class_fields = class_fields(list(archive.labels), list(range(1, classes)), models.resolution)
    baselines = {name: baseline for name in BASELINES
                 if options.wants(name) and (baseline := Baseline.of_bundle(name, models, archive, options.recipe)) is not None}
    ranks, top_dice, generated, gen_labels = rank_queries(models, archive, truth, queries, options, baselines, progress)

    group_of = np.array(queries.group)
    retrieval = {method: {g: recall_table(np.array(r)[group_of == g], np.array(top_dice[method])[group_of == g])
                          for g in groups if (group_of == g).any()}
                 for method, r in ranks.items()}
    return {
        "data": str(data), "split": split, "bundle": str(models.bundle), "bundle_id": models.bundle_id,
        "archive_images": len(dataset), "query_images": query_images, "queries": len(queries.target),
        "empty_queries": empty, "options": asdict(options), "methods": {m: METHOD_NOTES[m.split("[")[0]] for m in ranks},
        "retrieval": retrieval,
        "generation": generation_quality(models, queries, generated, gen_labels, archive.labels, archive.parts, archive.pixels,
                                         groups),
    }


@torch.no_grad()
def rank_queries(models: SystemModels, archive: Archive, truth: GroundTruth, queries: Queries, options: EvaluationOptions,
                 baselines: dict[str, Baseline], progress: Callable[[str, int, int], None]
                 ) -> tuple[dict[str, list[int]], dict[str, list[float]], dict[str, list[torch.Tensor]], dict[str, list[np.ndarray]]]:
    """Every method's rank of the right answer and DICE@10 per query, and each generator's images and
    S's label maps of them."""
    absent = {**{name: name not in baselines for name in BASELINES}, "oracle": truth.oracle is None}
    rows = [m for m in METHODS if not absent.get(m, False) and options.wants(m)] + list(options.labelled_rows())
    ranks: dict[str, list[int]] = {method: [] for method in rows}
    top_dice: dict[str, list[float]] = {method: [] for method in ranks}
    # the generation table's order: the baselines, then Sketch2MedI without and with H
    generated: dict[str, list[torch.Tensor]] = {**{name: [] for name in baselines}, "no_refiner": [], "sketch2medi": []}
    gen_labels: dict[str, list[np.ndarray]] = {name: [] for name in generated}
    code_mean = models.code_mean.cpu()
    for start in range(0, len(queries.target), options.batch):
        stop = min(start + options.batch, len(queries.target))
        sketches = np.stack(queries.sketches[start:stop])
        result = models.sketch2medi.generate(sketches)
        images = {"sketch2medi": result.steps[-1], "no_refiner": result.steps[0]}
        for name, baseline in baselines.items():
            images[name] = baseline.network.translate(sketch_to_tensor(sketches).to(models.device)).cpu()
        embeddings, labels = {}, {}
        for name, batch in images.items():
            generated[name].append(batch)
            embeddings[name] = F.normalize(models.C.embed(batch), dim=1).cpu()
            labels[name] = np.stack(models.S.predict_label_map(list(tensor_to_images(batch))))
            gen_labels[name].extend(labels[name])
        w = result.w - code_mean
        fields = sketch_field(sketches)
        fused = {name: torch.from_numpy(fuse_vectors(fields, w, embeddings[name], options.recipe)) for name in ("sketch2medi", "no_refiner")}
        for name, baseline in baselines.items():
            fused[name] = torch.from_numpy(fuse_vectors(fields, w, embeddings[name], baseline.recipe))
        for row in range(stop - start):
            number, target = start + row, queries.target[start + row]
            query = QueryVectors(queries.sketches[number], F.normalize(w[row], dim=0), fields[row],
                                 {name: vector[row] for name, vector in fused.items()}, embeddings["sketch2medi"][row],
                                 {name: label[row] for name, label in labels.items()}, queries.labelled[number])
            orders = method_orders(archive, query, options, models.label_classes, baselines)
            orders.update(reference_orders(truth, query.sketch, target, number, options))
            for method, order in orders.items():
                if method not in ranks:
                    continue
                ranks[method].append(rank_of(target, order))
                top_dice[method].append(float(truth.relevance[target][order[:RELEVANCE_DEPTH]].mean()))
        progress("queries", stop, len(queries.target))
    return ranks, top_dice, generated, gen_labels


class QueryVectors(NamedTuple):
    """One query in the form of each method's comparison."""

    sketch: np.ndarray  # uint8 (R, R)
    code: torch.Tensor  # E's code as an offset from its mean code, unit
    field: torch.Tensor  # its sketch field
    fused: dict[str, torch.Tensor]  # per generator, the fused vector
    embedding: torch.Tensor  # C(x_hat) of Sketch2MedI's image, unit
    labels: dict[str, np.ndarray]  # per generator, S's label map of its image
    labelled: LabelledSketch | None = None  # the query's strokes with their classes (full_labelled)


def method_orders(archive: Archive, query: QueryVectors, options: EvaluationOptions, classes: int,
                  baselines: dict[str, Baseline] | None = None) -> dict[str, np.ndarray]:
    """Per method, the archive in the order it ranks it for one query."""
    def reranked(similarity: np.ndarray, name: str, alignment: Alignment | None = options.alignment) -> np.ndarray:
        return rerank_order(similarity, query.labels[name], archive.labels, options.candidates, options.lam, classes,
                            query.sketch, alignment)

    full = (archive.fused @ query.fused["sketch2medi"]).numpy()
    rows = {
        "full": lambda: reranked(full, "sketch2medi"),
        "no_refiner": lambda: reranked((archive.fused @ query.fused["no_refiner"]).numpy(), "no_refiner"),
        "no_align": lambda: reranked(full, "sketch2medi", None),
        "no_rerank": lambda: np.argsort(-full, kind="stable"),
        "w_only": lambda: np.argsort(-(archive.codes @ query.code).numpy(), kind="stable"),
        "image_only": lambda: np.argsort(-(archive.embeddings @ query.embedding).numpy(), kind="stable"),
        "sketch_only": lambda: np.argsort(-(archive.fields @ query.field).numpy(), kind="stable"),
        "chamfer": lambda: np.argsort(chamfer_distances(query.sketch, archive.sketches, archive.transforms), kind="stable"),
    }
    for name, baseline in (baselines or {}).items():
        rows[name] = lambda name=name, baseline=baseline: reranked((baseline.archive @ query.fused[name]).numpy(), name)
    orders = {name: row() for name, row in rows.items() if options.wants(name)}
    for name, weights in options.labelled_rows().items():
        orders[name] = labelled_order(full, query.labels["sketch2medi"], query.sketch, query.labelled, archive, options, classes, weights)
    return orders


def labelled_order(similarity: np.ndarray, labels: np.ndarray, query_sketch: np.ndarray, sketch: LabelledSketch | None,
                   archive: Archive, options: EvaluationOptions, classes: int, weights: LabelWeights) -> np.ndarray:
    """full's order with the class match of `sketch` in the candidates' scores, as `search` does for
    a labelled sketch; full's order itself for a query with no labelled stroke."""
    order, scores = candidate_scores(similarity, labels, archive.labels, options.candidates, options.lam, classes, query_sketch,
                                     options.alignment)  # fmt: skip
    top = order[:options.candidates]
    if sketch is not None and sketch.drawn:
        drawn = [c - 1 for c in sketch.drawn]
        match = class_match(sketch, labels, archive.class_fields[top][:, drawn], [archive.labels[i] for i in top], weights)
        scores = labelled_scores(scores, match, weights)
    return np.concatenate([top[np.argsort(-scores, kind="stable")], order[options.candidates:]])


def reference_orders(truth: GroundTruth, sketch: np.ndarray, target: int, number: int,
                     options: EvaluationOptions = EvaluationOptions()) -> dict[str, np.ndarray]:
    """The reference rows' orders for query `number` (its image `target`): oracle, random, best."""
    orders = {
        "random": np.random.default_rng([RANDOM_SEED, number]).permutation(len(truth.labels)),
        "best": np.argsort(-truth.relevance[target], kind="stable"),
    }
    if truth.oracle is not None and options.wants("oracle"):
        orders["oracle"] = np.argsort(truth.oracle.distances(sketch), kind="stable")
    return orders


METHOD_NOTES = {
    "full": "Sketch2MedI (E, G, H) + fused vector + re-ranking by DICE and the aligned sketch",
    "no_refiner": "E and G only (no H), fused vector + DICE re-ranking",
    "no_align": "full pipeline re-ranked by similarity and DICE, without the alignment",
    "no_rerank": "full pipeline without re-ranking (the first stage alone)",
    "w_only": "E's code alone",
    "image_only": "C(x_hat) alone",
    "sketch_only": "no generator: the sketch field alone (soft chamfer, searchable)",
    "chamfer": "no generator: chamfer distance to each archive image's synthesized sketch",
    "pix2pix": "pix2pix instead of Sketch2MedI: sketch field + C(pix2pix image) + DICE re-ranking",
    "cyclegan": "CycleGAN (unpaired) instead of Sketch2MedI: sketch field + C(its image) + DICE re-ranking",
    "unit": "UNIT (unpaired) instead of Sketch2MedI: sketch field + C(its image) + DICE re-ranking",
    "ugatit": "U-GAT-IT (unpaired) instead of Sketch2MedI: sketch field + C(its image) + DICE re-ranking",
    "oracle": "reference: chamfer to ground-truth contours after the best rotation, scale and shift",
    "random": "reference: a random order (chance level)",
    "best": "reference: the archive ordered by DICE to the query image's masks (the highest DICE@10)",
    LABELLED: "full + the class match of the same sketch colour-coded by class (retrieval.labelled)",
}


def generation_quality(models: SystemModels, queries: Queries, generated: dict[str, list[torch.Tensor]],
                       gen_labels: dict[str, list[np.ndarray]], labels_archive: np.ndarray, parts: list,
                       pixels: np.ndarray, groups: list[str]) -> dict:
    """Per generator and query set (strength or DRAWN): FD_C and KID_C (mean and standard deviation
    over subsets) against the real query images,
    DICE(S(x_hat), S(x_ref)) and the perceptual distance to the reference (LPIPS-C, and LPIPS when installed)."""
    targets = np.array(queries.target)
    group_of = np.array(queries.group)
    backends = {"lpips_c": perceptual_distance("domain", network=models.C)}
    if lpips_unavailable_reason() is None:
        backends["lpips"] = perceptual_distance("lpips", device=models.device)
    reference_features = torch.cat([p.embeddings for p in parts])
    classes = models.label_classes
    report: dict[str, dict] = {}
    for name, batches in generated.items():
        images = torch.cat(batches)
        report[name] = {}
        for group in groups:
            chosen = np.nonzero(group_of == group)[0]
            if not len(chosen):
                continue
            real_idx = sorted(set(targets[chosen].tolist()))
            features = F.normalize(models.C.embed_many(images[chosen]), dim=1)
            comparable = len(chosen) > 1 and len(real_idx) > 1
            kid = kid_c(reference_features[real_idx], features) if comparable else None
            entry = {
                "fd_c": fd_c(reference_features[real_idx], features) if comparable else None,
                "kid_c": None if kid is None else kid[0], "kid_c_std": None if kid is None else kid[1],
                "dice": float(np.mean([dice_score(gen_labels[name][i], labels_archive[targets[i]], classes) for i in chosen])),
                "samples": int(len(chosen)),
            }
            references = torch.from_numpy(pixels[targets[chosen]]).permute(0, 3, 1, 2).float() / 127.5 - 1
            with torch.no_grad():
                for backend, distance in backends.items():
                    values = [distance(images[chosen[i : i + 16]].to(models.device), references[i : i + 16].to(models.device)).cpu()
                              for i in range(0, len(chosen), 16)]
                    entry[backend] = float(torch.cat(values).mean())
            report[name][group] = entry
    return report



def markdown_tables(report: dict) -> str:
    """The report as the Markdown tables docs/RESULTS.md shows."""
    sketches = report["options"].get("sketches")
    queried = f"drawn sketches from `{sketches}`" if sketches else f"`{report['split']}`"
    lines = [f"{report['queries']} queries on {report['query_images']} images of {queried}, archive of "
             f"{report['archive_images']} images; bundle `{report['bundle_id']}`", "",
             "| method | strength | R@1 | R@5 | R@10 | MRR | median rank | DICE@10 | R@100 | R@200 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, per_strength in report["retrieval"].items():
        for strength, row in per_strength.items():
            lines.append(f"| {method} | {strength} | {row['recall@1']:.3f} | {row['recall@5']:.3f} | {row['recall@10']:.3f} | "
                         f"{row['mrr']:.3f} | {row['median_rank']:g} | {row['dice@10']:.1f} | {row['recall@100']:.3f} | "
                         f"{row['recall@200']:.3f} |")
    lines += ["", "| generator | strength | FD_C | KID_C | DICE | LPIPS-C | LPIPS |", "|---|---|---|---|---|---|---|"]
    for name, per_strength in report["generation"].items():
        for strength, row in per_strength.items():
            fd = "-" if row["fd_c"] is None else f"{row['fd_c']:.4f}"
            kid = "-" if row.get("kid_c") is None else f"{row['kid_c']:.4f} ± {row['kid_c_std']:.4f}"
            lp = f"{row['lpips']:.3f}" if "lpips" in row else "n/a"
            lines.append(f"| {name} | {strength} | {fd} | {kid} | {row['dice']:.1f} | {row['lpips_c']:.3f} | {lp} |")
    return "\n".join(lines)
