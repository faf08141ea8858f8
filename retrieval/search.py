"""Sketch search over an indexed archive.

    sketch -> normalise -> E -> w -> G, H (T steps) -> x_hat
           -> vector(sketch, w, x_hat) -> FAISS top candidates
           -> re-rank by DICE(S(x_hat), stored masks) and the sketch aligned to the stored masks' contours -> top k

The vector is described in `retrieval.vector`, the DICE term in `retrieval.rerank`, the alignment in
`retrieval.align`; a labelled sketch's candidates are then re-scored per class (`retrieval.labelled`);
the hits' match quality (with a bundle's calibration) is in `retrieval.quality`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from generation.device import pick_device
from generation.errors import InputError
from generation.images import open_image, square_resize, tensor_to_images
from generation.labelled import LabelledSketch, decode_labelled_sketch
from generation.normalize import normalize_sketch
from indexing.files import load
from indexing.filters import SearchFilter
from indexing.workspace import check_bundle, open_workspace_for_search
from retrieval.align import Alignment, alignment_matcher, alignment_scores, final_score, mask_outlines, matched_distances
from retrieval.candidates import CandidateCache
from retrieval.defaults import DEFAULT_CANDIDATES, DEFAULT_LAMBDA
from retrieval.labelled import LabelWeights, check_classes, class_fields, class_match, labelled_scores, resized_labels
from retrieval.metrics import dice_matrix
from retrieval.models import SystemModels
from retrieval.quality import hit_features
from retrieval.relevance import Rocchio
from retrieval.vector import FIELD_GRID, RECIPE_SEPARATOR, ArchiveEmbedder, VectorRecipe, archive_parts, fuse_vectors, sketch_field

JSON_SCHEMA_VERSION = 3


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    frame: int
    score: float
    similarity: float
    dice: float | None  # percent; None without re-ranking
    # Aligned chamfer distance (pixels at the bundle's resolution) of the query's strokes to the
    # image's mask contours; None without re-ranking, alignment or strokes, or where either side has no contour
    aligned_chamfer: float | None = None
    class_match: float | None = None  # the labelled sketch's per-class match (0-1); None for a plain sketch
    quality: float | None = None  # probability of a close match (`retrieval.quality`); None without a calibration


class _Query(NamedTuple):
    vector: np.ndarray  # float32 (1, D), unit
    labels: np.ndarray  # uint8 label map the candidates' stored masks are compared with
    sketch: np.ndarray | None
    image: np.ndarray | None
    labelled: LabelledSketch | None = None  # the sketch's strokes with their classes (a labelled search)


class Candidate(NamedTuple):
    """One FAISS candidate on its way to a hit."""

    score: float  # the final score: the re-rank score, or the similarity without re-ranking
    similarity: float  # inner product of the query and archive vectors
    dice: float | None  # percent; None without re-ranking
    image_id: int
    aligned_chamfer: float | None = None  # pixels; None where not aligned
    class_match: float | None = None  # a labelled sketch's per-class match (retrieval.labelled)


@dataclass
class SearchResult:
    results: list[Hit]
    timings_ms: dict[str, float]
    # The normalised query sketch, uint8 (R, R) (an image's synthesized sketch); None for `like` alone
    sketch: np.ndarray | None = field(repr=False)
    # The generated image x_hat, uint8 (R, R, 3) (the query image itself); None for `like` alone
    image: np.ndarray | None = field(repr=False)
    labels: np.ndarray = field(repr=False)  # the masks the hits are re-ranked against: S(x_hat), S(image) or the liked image's
    where: str | None = None  # the filter, as written
    matching: int | None = None  # archive images matching the filter; None without one
    like: tuple[int, ...] = ()
    unlike: tuple[int, ...] = ()
    classes_drawn: tuple[int, ...] = ()  # the classes the labelled sketch's strokes carry
    # The best hit's quality is below the calibration's threshold; None when the hits have no quality
    no_close_match: bool | None = None
    quality_threshold: float | None = None  # the calibration's threshold; None without one

    def to_json(self) -> dict:
        """The documented `search --json` schema (docs/SEARCH.md)."""
        return {"schema_version": JSON_SCHEMA_VERSION, "results": [asdict(hit) for hit in self.results],
                "timings_ms": self.timings_ms, "where": self.where, "matching": self.matching,
                "like": list(self.like), "unlike": list(self.unlike), "classes_drawn": list(self.classes_drawn),
                "no_close_match": self.no_close_match, "quality_threshold": self.quality_threshold}


@dataclass(frozen=True)
class SearchRequest:
    """One search's inputs, as `Retriever.search` takes them (see there); `Retriever.search_many`
    runs a list of them together."""

    sketch: str | Path | Image.Image | np.ndarray | LabelledSketch | NormalizedSketch | None = None
    k: int = 10
    candidates: int = DEFAULT_CANDIDATES
    rerank: bool = True
    lam: float = DEFAULT_LAMBDA
    steps: int | None = None
    image: str | Path | Image.Image | np.ndarray | None = None
    like: Iterable[int] = ()
    unlike: Iterable[int] = ()
    where: str | SearchFilter | None = None
    feedback: Rocchio = Rocchio()
    alignment: Alignment | None = Alignment()
    labelled: bool = False
    label_weights: LabelWeights = LabelWeights()


@dataclass(frozen=True)
class NormalizedSketch:
    """A request's sketch already normalised for the bundle (`Retriever.normalized`), so that the
    search does not normalise it again."""

    sketch: np.ndarray | LabelledSketch  # canonical uint8 (R, R), or a labelled sketch's strokes and classes
    normalize_ms: float  # what normalising it took: the search's "normalize" stage


class _Stopwatch:
    """Milliseconds per stage, each from the previous lap (or restart) to this one."""

    def __init__(self, device: torch.device):
        self.device, self.timings, self.clock = device, {}, time.perf_counter()

    def restart(self) -> None:
        self.clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.timings[stage] = round((now - self.clock) * 1000, 3)
        self.clock = now


@dataclass
class _Plan:
    """A request on its way through `Retriever.search_many`: checked, its sketch normalised or its image read."""

    number: int  # its place in the requests
    request: SearchRequest
    like: tuple[int, ...]
    unlike: tuple[int, ...]
    search_filter: SearchFilter | None
    watch: _Stopwatch
    liked: np.ndarray  # float32 (len(like), D) stored vectors
    disliked: np.ndarray
    canonical: np.ndarray | None = None  # the normalised sketch, uint8 (R, R)
    decoded: LabelledSketch | None = None  # a labelled sketch's strokes and classes
    pixels: np.ndarray | None = None  # the query image, uint8 (H, W, 3)


def load_query_image(image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    """A query image (any file `index` reads, PIL image or array) -> uint8 RGB (H, W, 3)."""
    if isinstance(image, (str, Path)):
        return load(image)
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"query image of shape {array.shape} and type {array.dtype}: expected uint8 RGB (H, W, 3)")
    return array


def vector_part_sizes(models: SystemModels) -> tuple[int, int, int]:
    """Lengths of the search vector's three parts: the sketch field, E's code, C's embedding."""
    return FIELD_GRID**2, models.sketch2medi.G.config.w_dim, models.C.embedding_dim


def _image_ids(ids: Iterable[int]) -> tuple[int, ...]:
    """Catalog ids in the order given, each once."""
    return tuple(dict.fromkeys(int(i) for i in ids))


def load_sketch(sketch: str | Path | Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Any user sketch (file, PIL image, array) -> canonical uint8 (size, size)."""
    if isinstance(sketch, (str, Path)):
        return normalize_sketch(open_image(sketch), size, name=str(sketch))
    return normalize_sketch(sketch, size)


def load_labelled_sketch(sketch: str | Path | Image.Image | np.ndarray | LabelledSketch, size: int, num_classes: int) -> LabelledSketch:
    """A colour-coded sketch (file, PIL image, array; or already decoded) -> its canonical sketch
    and class map at `size`; a class the bundle does not have is a one-line InputError."""
    if isinstance(sketch, LabelledSketch):
        if sketch.sketch.shape != (size, size):
            raise InputError(f"labelled sketch of shape {sketch.sketch.shape}: expected the bundle's ({size}, {size})")
        check_classes(sketch, num_classes)
        return sketch
    if isinstance(sketch, (str, Path)):
        return decode_labelled_sketch(open_image(sketch), size, num_classes, name=str(sketch))
    return decode_labelled_sketch(sketch, size, num_classes)


class Retriever:
    """`Retriever(workspace).search(sketch, k)`: the search API the CLI and the server use."""

    def __init__(self, workspace: str | Path | None = None, bundle: str | Path | None = None, db_url: str | None = None,
                 device: str = "auto", models: SystemModels | None = None):
        # On a GPU machine the exact index searches there too (when faiss has GPU support).
        on_gpu = (models.device if models is not None else pick_device(device)).type == "cuda"
        self.workspace = open_workspace_for_search(workspace, db_url, use_gpu=on_gpu)
        try:
            stored = self.workspace.bundle_id
            if RECIPE_SEPARATOR not in stored:
                raise InputError(f"{self.workspace.path}: was indexed by an older sketch2medi (or not by `index`); "
                                 f"re-index the images into a new workspace")
            if models is None:
                models = SystemModels(bundle or self.workspace.bundle_path or None, device)
            self.models = models
            self.calibration = models.calibration  # a damaged or mismatched one is refused here, before any search
            self.embedder = ArchiveEmbedder(models, VectorRecipe.parse(stored.split(RECIPE_SEPARATOR)[1]))
            self.candidates = CandidateCache(self.workspace, models.resolution)  # what re-ranking reads of the candidates
            check_bundle(self.workspace.path, stored, self.embedder.bundle_id,
                         "search with the bundle it was built with (another bundle makes other vectors) or re-index into a new workspace",
                         indexed_path=self.workspace.bundle_path, bundle_path=models.bundle)  # fmt: skip
        except BaseException:
            self.workspace.close()
            raise

    def close(self) -> None:
        self.workspace.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search(self, sketch: str | Path | Image.Image | np.ndarray | None = None, k: int = 10, candidates: int = DEFAULT_CANDIDATES,
               rerank: bool = True, lam: float = DEFAULT_LAMBDA, steps: int | None = None, *,
               image: str | Path | Image.Image | np.ndarray | None = None, like: Iterable[int] = (), unlike: Iterable[int] = (),
               where: str | SearchFilter | None = None, feedback: Rocchio = Rocchio(),
               alignment: Alignment | None = Alignment(), labelled: bool = False,
               label_weights: LabelWeights = LabelWeights()) -> SearchResult:
        """The top k archive images for a sketch, or for an image (`image`, query by example), or
        like the archive images `like` (no sketch or image).

        like, unlike: catalog ids; with a sketch or image they move its vector toward the liked and
            away from the disliked images (`feedback`, see `retrieval.relevance`).
        where: only images matching this filter (`indexing.filters`), applied inside the vector search.
        alignment: the re-ranking's alignment of the query's strokes to each candidate's contours
            (`retrieval.align`); None re-ranks by similarity and DICE alone. Not used with `like` alone
            (no strokes) or without re-ranking.
        labelled: read the sketch as colour-coded by class (`generation.labelled`; implied for a
            `LabelledSketch`) and re-score the candidates per class drawn (`retrieval.labelled`,
            weighted by `label_weights`; with re-ranking only).
        """
        [outcome] = self.search_many([SearchRequest(sketch, k, candidates, rerank, lam, steps, image=image, like=like, unlike=unlike,
                                                    where=where, feedback=feedback, alignment=alignment, labelled=labelled,
                                                    label_weights=label_weights)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @torch.no_grad()
    def search_many(self, requests: Sequence[SearchRequest]) -> list[SearchResult | Exception]:
        """Each request's result, as `search` returns it alone, or the error that stopped it (a bad
        sketch, an unknown id: an InputError) without stopping the others. The networks run once
        for all of them: E, G and H on the sketches with the same number of refinement steps, C on
        their images, S on those re-ranked, and the query images through the archive's networks
        together; the vector search and re-ranking are per request. The hits are those of each
        search alone; scores may differ in the last float32 digits (a batch's convolutions sum in
        another order). A network stage's time in `timings_ms` is that of the whole batch."""
        outcomes: list[SearchResult | Exception | None] = [None] * len(requests)
        plans: list[_Plan] = []
        for n, request in enumerate(requests):
            try:
                plans.append(self._plan(n, request))
            except Exception as error:  # one request's fault is its own outcome
                outcomes[n] = error
        for plan, query in zip(plans, self._queries_or_each(plans)):
            try:
                outcomes[plan.number] = query if isinstance(query, Exception) else self._ranked(plan, query)
            except Exception as error:
                outcomes[plan.number] = error
        return outcomes

    def _plan(self, number: int, request: SearchRequest) -> _Plan:
        """A request checked, its ids' stored vectors read and its sketch normalised (or image read)."""
        r, m = request, self.models
        if r.k < 1 or r.candidates < 1:
            raise InputError("k and candidates must be positive")
        if not 0 <= r.lam <= 1:
            raise InputError(f"lambda {r.lam}: must be between 0 and 1")
        like, unlike = _image_ids(r.like), _image_ids(r.unlike)
        if r.sketch is not None and r.image is not None:
            raise InputError("give a sketch or an image to search by, not both")
        if r.sketch is None and r.image is None and not like:
            raise InputError("nothing to search by: give a sketch, an image, or the id of an archive image to find more like")
        if set(like) & set(unlike):
            raise InputError(f"image {sorted(set(like) & set(unlike))[0]} is both liked and disliked; keep it in one of the two")
        search_filter = SearchFilter.parse(r.where) if isinstance(r.where, str) else r.where
        watch = _Stopwatch(m.device)
        stored = self._stored_vectors(like + unlike)
        liked, disliked = (np.array([stored[i] for i in ids], np.float32).reshape(len(ids), self.workspace.dim) for ids in (like, unlike))
        plan = _Plan(number, r, like, unlike, search_filter, watch, liked, disliked)
        if r.sketch is not None:
            normalized = self.normalized(r).sketch
            if isinstance(normalized.sketch, LabelledSketch):
                plan.decoded, plan.canonical = normalized.sketch, normalized.sketch.sketch
            else:
                plan.canonical = normalized.sketch
            watch.timings["normalize"] = normalized.normalize_ms
            watch.restart()
        elif r.image is not None:
            plan.pixels = load_query_image(r.image)
            watch.lap("embed")  # reading the image counts to its embedding, as in the timings of one search
        return plan

    def normalized(self, request: SearchRequest) -> SearchRequest:
        """The request with its sketch normalised for the bundle (a `NormalizedSketch`; labelled:
        decoded by class). Needs no network, so it may run on any thread (the server does it on its
        decoding thread, beside the model thread); a bad sketch is a one-line InputError."""
        if request.sketch is None or isinstance(request.sketch, NormalizedSketch):
            return request
        start, m = time.perf_counter(), self.models
        if request.labelled or isinstance(request.sketch, LabelledSketch):
            sketch = load_labelled_sketch(request.sketch, m.resolution, m.S.config.num_classes)
        else:
            sketch = load_sketch(request.sketch, m.resolution)
        return replace(request, sketch=NormalizedSketch(sketch, round((time.perf_counter() - start) * 1000, 3)))

    def _queries_or_each(self, plans: list[_Plan]) -> list[_Query | Exception]:
        """`_queries` of the plans together; should the batch fail, of each alone, so that one
        request's failure stays its own."""
        try:
            return self._queries(plans)
        except Exception as error:
            if len(plans) == 1:
                return [error]
            return [self._queries_or_each([plan])[0] for plan in plans]

    def _queries(self, plans: list[_Plan]) -> list[_Query]:
        """Each plan's query vector (1, D), the masks its candidates are re-ranked against and what
        to show of it; the networks run once per kind of query (see `search_many`)."""
        m = self.models
        sketches: dict[int, list[int]] = {}  # refinement steps -> the sketch queries (indices into plans)
        images = [n for n, plan in enumerate(plans) if plan.pixels is not None]
        for n, plan in enumerate(plans):
            if plan.canonical is not None:
                steps = plan.request.steps
                sketches.setdefault(m.sketch2medi.default_steps if steps is None else steps, []).append(n)
        vectors: dict[int, np.ndarray] = {}
        labels: dict[int, np.ndarray] = {}
        shown: dict[int, np.ndarray] = {}
        canonical: dict[int, np.ndarray] = {}
        for steps, members in sketches.items():
            watch = _Stopwatch(m.device)
            batch = np.stack([plans[n].canonical for n in members])
            generation = m.sketch2medi.generate(batch, steps, batch_size=len(members), on_stage=watch.lap)
            pixels = generation.images.to(m.device)
            fused = fuse_vectors(sketch_field(batch), generation.w.to(m.device) - m.code_mean, m.C.embed(pixels), self.embedder.recipe)
            watch.lap("C")
            pictures = tensor_to_images(pixels)
            reranked = [i for i, n in enumerate(members) if plans[n].request.rerank]
            predicted = dict(zip(reranked, m.S.predict_label_map([pictures[i] for i in reranked])
                                 if reranked else []))
            watch.lap("S")
            for i, n in enumerate(members):
                plans[n].watch.timings.update(watch.timings)
                vectors[n], shown[n], canonical[n] = fused[i : i + 1], pictures[i], batch[i]
                labels[n] = predicted[i] if i in predicted else np.zeros(pictures[i].shape[:2], np.uint8)
        if images:  # query by example: the vector an archive image gets (its synthesized sketch, E's code, C's embedding)
            watch = _Stopwatch(m.device)
            parts = archive_parts(m, [plans[n].pixels for n in images])
            fused = fuse_vectors(parts.fields, parts.codes - m.code_mean.cpu(), parts.embeddings, self.embedder.recipe)
            watch.lap("embed")
            for i, n in enumerate(images):
                timings = plans[n].watch.timings
                timings["embed"] = round(timings.get("embed", 0.0) + watch.timings["embed"], 3)
                vectors[n], labels[n], canonical[n] = fused[i : i + 1], parts.labels[i], parts.sketches[i]
                shown[n] = square_resize(plans[n].pixels, m.resolution)
        queries = []
        for n, plan in enumerate(plans):
            if n not in vectors:  # more like the liked archive images: their stored vectors and masks
                masks = self.workspace.masks_for(plan.like[:1])[plan.like[0]]
                queries.append(_Query(plan.request.feedback.move(None, plan.liked, plan.disliked)[None], masks, None, None))
                continue
            vector = vectors[n]
            if plan.like or plan.unlike:
                vector = plan.request.feedback.move(vector[0], plan.liked, plan.disliked)[None]
            queries.append(_Query(vector, labels[n], canonical[n], shown[n], plan.decoded))
        return queries

    def _ranked(self, plan: _Plan, query: _Query) -> SearchResult:
        """A query's FAISS candidates, re-ranked, as the request's result."""
        r, watch, search_filter = plan.request, plan.watch, plan.search_filter
        watch.restart()
        allowed = self.workspace.catalog.ids_matching(search_filter) if search_filter is not None else None
        available = self.workspace.index.ntotal if allowed is None else len(allowed)
        found = []
        if available:
            scores, ids = self.workspace.index.search(query.vector, min(max(r.candidates, r.k), available), allowed)
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        watch.lap("faiss")
        ranked = self._reranked(found, query, r.lam, r.alignment) if r.rerank else [Candidate(s, s, None, i) for i, s in found]
        if r.rerank and query.labelled is not None and query.labelled.drawn:
            ranked = self._class_matched(ranked, query, r.label_weights)
        watch.lap("rerank")
        records = self.workspace.records_for([c.image_id for c in ranked[: r.k]])
        hits = [Hit(rank, c.image_id, records[c.image_id].path, records[c.image_id].frame, round(c.score, 6),
                    round(c.similarity, 6), None if c.dice is None else round(c.dice, 3),
                    None if c.aligned_chamfer is None else round(c.aligned_chamfer, 3),
                    None if c.class_match is None else round(c.class_match, 6))
                for rank, c in enumerate((c for c in ranked if c.image_id in records), start=1)][: r.k]
        no_close_match = self._rate_quality(query, hits, {c.image_id: c.dice for c in ranked})
        timings = watch.timings
        timings["total"] = round(sum(timings.values()), 3)
        return SearchResult(hits, timings, query.sketch, query.image, query.labels, search_filter.text if search_filter else None,
                            None if allowed is None else len(allowed), plan.like, plan.unlike,
                            tuple(query.labelled.drawn) if query.labelled is not None else (), no_close_match,
                            None if self.calibration is None else self.calibration.threshold)

    def _rate_quality(self, query: _Query, hits: list[Hit], dice: dict[int, float | None]) -> bool | None:
        """Set each hit's quality from the calibration; whether the best is below its threshold.
        None (and no quality) without a calibration, without hits or without a feature (`hit_features`)."""
        if self.calibration is None or not hits:
            return None
        found, vectors = self.workspace.catalog.vectors([hit.id for hit in hits])
        by_id = dict(zip(found.tolist(), vectors))
        hit_dice = [dice[hit.id] for hit in hits]
        domain = None
        if self.calibration.domain is not None and query.sketch is not None:
            domain = float(self.models.domain_logits(query.sketch[None])[0])
        features = hit_features(query.vector[0], np.stack([by_id[hit.id] for hit in hits]), None if None in hit_dice else np.array(hit_dice),
                                vector_part_sizes(self.models), domain)
        quality = self.calibration.quality(features)
        if quality is None:
            return None
        for hit, value in zip(hits, quality):
            hit.quality = round(float(value), 4)
        return bool(quality[0] < self.calibration.threshold)

    def _stored_vectors(self, ids: tuple[int, ...]) -> dict[int, np.ndarray]:
        """The archive vectors of these catalog ids; an unknown id is a one-line InputError."""
        if not ids:
            return {}
        found, vectors = self.workspace.catalog.vectors(ids)
        missing = sorted(set(ids) - set(found.tolist()))
        if missing:
            raise InputError(f"image id {missing[0]}: not in this workspace; use an id from the search results")
        return dict(zip(found.tolist(), vectors))

    def _reranked(self, found: list[tuple[int, float]], query: _Query, lam: float, alignment: Alignment | None) -> list[Candidate]:
        """(image id, similarity) pairs -> candidates by the final score (ties: lower id first)."""
        ids, side = [i for i, _ in found], (self.models.resolution,) * 2
        labels = resized_labels(query.labels, side[0])
        stored = self.candidates.label_maps(ids)
        similarity = np.array([s for _, s in found], np.float64)
        dice = np.nan_to_num(dice_matrix(labels[None], stored, self.models.label_classes)[0]) if ids else np.zeros(0)
        distances = None
        if alignment is not None and query.sketch is not None and ids:
            matcher = self.candidates.matcher(ids, alignment_matcher(side[0], alignment), lambda maps: mask_outlines(maps, side[0]))
            distances = matched_distances(query.sketch, matcher)
        scores = final_score(similarity, dice, lam, None if distances is None else alignment_scores(distances, alignment.tau),
                             0.0 if alignment is None else alignment.weight)
        ranked = [Candidate(float(scores[n]), float(similarity[n]), float(dice[n]), image_id,
                            None if distances is None or not np.isfinite(distances[n]) else float(distances[n]))
                  for n, (image_id, _) in enumerate(found)]
        ranked.sort(key=lambda c: (-c.score, c.image_id))
        return ranked

    def _class_matched(self, ranked: list[Candidate], query: _Query, weights: LabelWeights) -> list[Candidate]:
        """The re-ranked candidates re-scored with the labelled sketch's per-class match (ties: lower id first)."""
        sketch = query.labelled
        stored = list(self.candidates.label_maps([c.image_id for c in ranked]))  # read by `_reranked` just before
        fields = class_fields(stored, sketch.drawn, sketch.sketch.shape[0])
        match = class_match(sketch, query.labels, fields, stored, weights)
        scores = labelled_scores(np.array([c.score for c in ranked]), match, weights)
        matched = [c._replace(score=float(s), class_match=float(v)) for c, s, v in zip(ranked, scores, match)]
        matched.sort(key=lambda c: (-c.score, c.image_id))
        return matched
