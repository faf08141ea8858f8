"""Sketch search over an indexed archive.

    sketch -> normalise -> E -> w -> G, H (T steps) -> x_hat
           -> vector(sketch, w, x_hat) -> FAISS top candidates -> DICE(S(x_hat), stored masks) re-rank -> top k

The vector is described in `retrieval.vector`, the re-ranking score in `retrieval.rerank`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from generation.device import pick_device
from generation.errors import InputError
from generation.images import open_image, tensor_to_images
from generation.normalize import normalize_sketch
from indexing.workspace import check_bundle, open_workspace_for_search
from retrieval.defaults import DEFAULT_LAMBDA
from retrieval.models import SystemModels
from retrieval.rerank import dice_score, rerank_score
from retrieval.vector import RECIPE_SEPARATOR, ArchiveEmbedder, VectorRecipe, fuse_vectors, sketch_field

JSON_SCHEMA_VERSION = 1


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    frame: int
    score: float
    similarity: float
    dice: float | None  # percent; None without re-ranking


class Candidate(NamedTuple):
    """One FAISS candidate on its way to a hit."""

    score: float  # the final score: the re-rank score, or the similarity without re-ranking
    similarity: float  # inner product of the query and archive vectors
    dice: float | None  # percent; None without re-ranking
    image_id: int


@dataclass
class SearchResult:
    results: list[Hit]
    timings_ms: dict[str, float]
    sketch: np.ndarray = field(repr=False)  # the normalised query sketch, uint8 (R, R)
    image: np.ndarray = field(repr=False)  # the generated image x_hat, uint8 (R, R, 3)
    labels: np.ndarray = field(repr=False)  # S(x_hat), uint8 (R, R)

    def to_json(self) -> dict:
        """The documented `search --json` schema (docs/SEARCH.md)."""
        return {"schema_version": JSON_SCHEMA_VERSION, "results": [asdict(hit) for hit in self.results],
                "timings_ms": self.timings_ms}


def load_sketch(sketch: str | Path | Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Any user sketch (file, PIL image, array) -> canonical uint8 (size, size)."""
    if isinstance(sketch, (str, Path)):
        return normalize_sketch(open_image(sketch), size, name=str(sketch))
    return normalize_sketch(sketch, size)


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
            self.embedder = ArchiveEmbedder(models, VectorRecipe.parse(stored.split(RECIPE_SEPARATOR)[1]))
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

    @torch.no_grad()
    def search(self, sketch: str | Path | Image.Image | np.ndarray, k: int = 10, candidates: int = 100,
               rerank: bool = True, lam: float = DEFAULT_LAMBDA, steps: int | None = None) -> SearchResult:
        if k < 1 or candidates < 1:
            raise InputError("k and candidates must be positive")
        if not 0 <= lam <= 1:
            raise InputError(f"lambda {lam}: must be between 0 and 1")
        m = self.models
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            if m.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            timings[stage] = round((now - clock) * 1000, 3)
            clock = now

        canonical = load_sketch(sketch, m.resolution)
        lap("normalize")
        generation = m.sketch2medi.generate(canonical, steps, on_stage=lap)
        image = generation.images.to(m.device)
        vector = fuse_vectors(sketch_field(canonical[None]), generation.w.to(m.device) - m.code_mean, m.C.embed(image),
                              self.embedder.recipe)
        lap("C")
        count = min(max(candidates, k), max(self.workspace.index.ntotal, 1))
        scores, ids = self.workspace.index.search(vector, count)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        lap("faiss")
        generated = tensor_to_images(image)[0]
        labels = m.S.predict_label_map([generated])[0] if rerank else np.zeros(generated.shape[:2], np.uint8)
        lap("S")
        ranked = self._reranked(found, labels, lam) if rerank else [Candidate(s, s, None, i) for i, s in found]
        lap("rerank")
        records = self.workspace.records_for([c.image_id for c in ranked[:k]])
        hits = [Hit(rank, c.image_id, records[c.image_id].path, records[c.image_id].frame, round(c.score, 6),
                    round(c.similarity, 6), None if c.dice is None else round(c.dice, 3))
                for rank, c in enumerate((c for c in ranked if c.image_id in records), start=1)][:k]
        timings["total"] = round(sum(timings.values()), 3)
        return SearchResult(hits, timings, canonical, generated, labels)

    def _reranked(self, found: list[tuple[int, float]], labels: np.ndarray, lam: float) -> list[Candidate]:
        """(image id, similarity) pairs -> candidates by re-rank score (ties: lower id first)."""
        masks = self.workspace.masks_for([i for i, _ in found])
        classes = self.models.label_classes
        ranked = []
        for image_id, similarity in found:
            stored = masks.get(image_id)
            dice = dice_score(labels, stored, classes) if stored is not None else 0.0
            ranked.append(Candidate(rerank_score(similarity, dice, lam), similarity, dice, image_id))
        ranked.sort(key=lambda c: (-c.score, c.image_id))
        return ranked
