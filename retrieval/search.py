"""Sketch search over an indexed archive.

    sketch -> normalise -> E -> w -> G, H (T steps) -> x_hat
           -> vector(sketch, w, x_hat) -> FAISS top candidates -> DICE(S(x_hat), stored masks) re-rank -> top k

The vector of an image is the fusion of three unit vectors,

    v = [sqrt(a_s) f / |f|,  sqrt(a_c) (w - m) / |w - m|,  sqrt(a_i) e / |e|],   a_s + a_c + a_i = 1,

so the inner product of two vectors is a_s cos(f, f') + a_c cos(w - m, w' - m) + a_i cos(e, e')
with the weights of the `VectorRecipe`. The sketch is the user's for a query and S's synthesized
sketch for an archive image (normalised the same way), and:
  f  the sketch's field (`sketch_field`): exp(-distance to the nearest stroke / sigma), pooled to
     16 x 16. Where the lines are, tolerant of a few pixels of displacement: a soft chamfer match
     that FAISS can search.
  w  E's code of the sketch, compared as an offset from m, E's mean code over its training sketches
     (every code shares that large component, which would otherwise put all cosines close to 1).
  e  C's embedding of the image: x_hat for a query, x itself for an archive image.
The default weights were chosen on validation splits (docs/RESULTS.md, section "Retrieval"): with
the 64 px `cpu` bundles the field finds the right image far more often than E's code or C's view of
x_hat, which get small weights (they help a little on vocalfolds and cost a little on the phantom).
Archive sketches go through the same normalisation as queries before E, so a query that is an
archive image's own synthesized sketch gets exactly that image's code and field.

Final score of a candidate: lambda * similarity + (1 - lambda) * DICE / 100 (DICE in percent,
between S(x_hat) and the candidate's stored masks, 0 when neither has any structure).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from generation.bundle import bundle_id_of, default_bundle, network_entries
from generation.device import pick_device
from generation.errors import InputError
from generation.images import open_image, square_resize, tensor_to_images
from generation.moco import FeatureNetwork
from generation.normalize import normalize_sketch
from generation.pipeline import Sketch2MedI
from generation.refiner import refine
from generation.registry import load_network, network_exists
from generation.sketch import INK, sketch_to_tensor
from generation.solov2 import SOLOv2
from indexing.embedding import EmbeddedBatch
from indexing.workspace import check_bundle, open_workspace_for_search
from retrieval.defaults import DEFAULT_LAMBDA, DEFAULT_WEIGHTS
from retrieval.metrics import dice_per_image

RECIPE_SEPARATOR = ":vector="
JSON_SCHEMA_VERSION = 1
FIELD_GRID = 16  # the sketch field is pooled to FIELD_GRID x FIELD_GRID
FIELD_SIGMA = 1 / 32  # decay length of the field, as a fraction of the sketch side (2 px at 64 px)


@dataclass(frozen=True)
class VectorRecipe:
    """Weights of the three parts of a vector (see the module docstring); normalised to sum 1."""

    sketch: float = DEFAULT_WEIGHTS["sketch"]
    code: float = DEFAULT_WEIGHTS["code"]
    image: float = DEFAULT_WEIGHTS["image"]

    def __post_init__(self) -> None:
        weights = (self.sketch, self.code, self.image)
        if min(weights) < 0 or sum(weights) <= 0:
            raise InputError(f"vector weights {weights}: must be non-negative, not all 0")
        total = sum(weights)
        for name, value in zip(("sketch", "code", "image"), weights):
            object.__setattr__(self, name, round(value / total, 6))

    @classmethod
    def parse(cls, text: str) -> VectorRecipe:
        """'sketch=0.9,code=0.05,image=0.05' (the form `tag` writes, and `index --weights` takes)."""
        malformed = InputError(f"vector weights {text!r}: expected sketch=A,code=B,image=C")
        try:
            weights = {name.strip(): float(value) for name, value in (part.split("=") for part in text.split(","))}
        except ValueError:
            raise malformed from None
        if not all(math.isfinite(value) for value in weights.values()):  # NaN passes every comparison
            raise InputError(f"vector weights {text!r}: every weight must be a finite number, e.g. sketch=0.9,code=0.05,image=0.05")
        try:
            return cls(**weights)
        except (TypeError, ValueError):
            raise malformed from None

    @property
    def tag(self) -> str:
        return f"sketch={self.sketch:g},code={self.code:g},image={self.image:g}"


def sketch_field(sketches: np.ndarray) -> torch.Tensor:
    """Canonical sketches uint8 (N, R, R) -> (N, FIELD_GRID**2) unit rows (zeros for a blank sketch)."""
    assert sketches.ndim == 3 and sketches.dtype == np.uint8, (sketches.shape, sketches.dtype)
    sigma = FIELD_SIGMA * sketches.shape[-1]
    fields = np.zeros(sketches.shape, np.float32)
    for out, sketch in zip(fields, sketches):
        ink = sketch == INK
        if ink.any():
            out[:] = np.exp(-ndimage.distance_transform_edt(~ink) / sigma)
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(fields)[:, None], FIELD_GRID).flatten(1)
    return F.normalize(pooled, dim=1)


def fuse_vectors(fields: torch.Tensor, w_offsets: torch.Tensor, embeddings: torch.Tensor, recipe: VectorRecipe) -> np.ndarray:
    """(N, Df), (N, Dw), (N, De) -> float32 (N, Df + Dw + De), unit rows (see the module docstring)."""
    assert len(fields) == len(w_offsets) == len(embeddings), (fields.shape, w_offsets.shape, embeddings.shape)
    parts = [(fields, recipe.sketch), (w_offsets, recipe.code), (embeddings, recipe.image)]
    fused = torch.cat([F.normalize(part.float().cpu(), dim=1) * weight**0.5 for part, weight in parts], dim=1)
    return fused.numpy().astype(np.float32)


class SystemModels:
    """Every network of a bundle that search and indexing use: G, E, H (Sketch2MedI), S and C."""

    def __init__(self, bundle: str | Path | None = None, device: str | torch.device = "auto"):
        self.bundle = Path(bundle) if bundle is not None else default_bundle()
        self.device = pick_device(device) if isinstance(device, str) else device
        self.generator = Sketch2MedI.from_bundle(self.bundle, self.device)
        for name in ("synthesizer", "moco"):  # refuse before loading either
            if not network_exists(self.bundle, name):
                raise InputError(f"{self.bundle}: has no {name}.safetensors; train it with `train {name}` (or `train all`)")
        self.S: SOLOv2 = load_network("synthesizer", self.bundle, self.device)
        self.C: FeatureNetwork = load_network("moco", self.bundle, self.device)
        self.bundle_id = bundle_id_of(network_entries(self.bundle))

    @property
    def resolution(self) -> int:
        return self.generator.resolution

    @property
    def label_classes(self) -> int:
        """Classes in S's label maps, background included: every mask DICE compares comes from S."""
        return self.S.config.num_classes + 1

    @property
    def code_mean(self) -> torch.Tensor:
        return self.generator.E.code_mean


class ArchiveEmbedder:
    """The `indexing.embedding.Embedder` of a bundle: per image S's masks, x_sk = S(x), its field f,
    w = E(x_sk), e = C(x), and the fused vector."""

    def __init__(self, models: SystemModels, recipe: VectorRecipe = VectorRecipe()):
        self.models, self.recipe = models, recipe
        self.bundle_path = str(models.bundle)
        # The vector recipe is part of the id: a workspace is only searched the way it was indexed.
        self.bundle_id = f"{models.bundle_id}{RECIPE_SEPARATOR}{recipe.tag}"
        self.dim = FIELD_GRID**2 + models.generator.G.config.w_dim + models.C.embedding_dim

    def embed_images(self, images: list[np.ndarray]) -> EmbeddedBatch:
        parts = archive_parts(self.models, images)
        vectors = fuse_vectors(parts.fields, parts.codes - self.models.code_mean.cpu(), parts.embeddings, self.recipe)
        return EmbeddedBatch(vectors, list(parts.labels))


@dataclass
class ArchiveParts:
    embeddings: torch.Tensor  # (N, De) C(x)
    codes: torch.Tensor  # (N, w_dim) E(normalised S(x))
    fields: torch.Tensor  # (N, FIELD_GRID**2) sketch_field(normalised S(x))
    labels: np.ndarray  # uint8 (N, R, R) S's label maps
    sketches: np.ndarray  # uint8 (N, R, R) normalised synthesized sketches


@torch.no_grad()
def archive_parts(models: SystemModels, images: list[np.ndarray]) -> ArchiveParts:
    """What indexing computes per archive image (any size; centre-cropped to a square, as in training)."""
    m, size = models, models.resolution
    sketches, labels = m.S.synthesize([square_resize(image, m.S.config.size) for image in images], size)
    pixels = torch.from_numpy(np.stack([square_resize(image, size) for image in images])).permute(0, 3, 1, 2)
    embeddings = m.C.embed(pixels.float().to(m.device) / 127.5 - 1)
    sketches = np.stack([_normalized(sketch) for sketch in sketches])
    codes = m.generator.E(sketch_to_tensor(sketches).to(m.device))
    return ArchiveParts(embeddings.cpu(), codes.cpu(), sketch_field(sketches), labels, sketches)


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    frame: int
    score: float
    similarity: float
    dice: float | None  # percent; None without re-ranking


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
        model = m.generator
        steps = model.default_steps if steps is None else steps
        if steps and model.H is None:
            raise InputError(f"{m.bundle}: has no refiner H; search with --steps 0 or train H")
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
        sketch_tensor = sketch_to_tensor(canonical).to(m.device)
        w = model.E(sketch_tensor)
        lap("E")
        image = refine(model.G, model.H, sketch_tensor, w, steps, on_image=lambda t: lap(f"H{t}" if t else "G"))[-1]
        vector = fuse_vectors(sketch_field(canonical[None]), w - m.code_mean, m.C.embed(image), self.embedder.recipe)
        lap("C")
        count = min(max(candidates, k), max(self.workspace.index.ntotal, 1))
        scores, ids = self.workspace.index.search(vector, count)
        found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        lap("faiss")
        generated = tensor_to_images(image)[0]
        labels = m.S.predict_label_map([generated])[0] if rerank else np.zeros(generated.shape[:2], np.uint8)
        lap("S")
        ranked = []
        if rerank:
            masks = self.workspace.masks_for([i for i, _ in found])
            classes = m.label_classes
            for image_id, similarity in found:
                stored = masks.get(image_id)
                dice = _dice(labels, stored, classes) if stored is not None else 0.0
                ranked.append((lam * similarity + (1 - lam) * dice / 100, similarity, dice, image_id))
            ranked.sort(key=lambda row: (-row[0], row[3]))
        else:
            ranked = [(similarity, similarity, None, image_id) for image_id, similarity in found]
        lap("rerank")
        records = self.workspace.records_for([row[3] for row in ranked[:k]])
        hits = [Hit(rank, image_id, records[image_id].path, records[image_id].frame, round(score, 6), round(similarity, 6),
                    None if dice is None else round(dice, 3))
                for rank, (score, similarity, dice, image_id) in enumerate((r for r in ranked if r[3] in records), start=1)][:k]
        timings["total"] = round(sum(timings.values()), 3)
        return SearchResult(hits, timings, canonical, generated, labels)


def _normalized(sketch: np.ndarray) -> np.ndarray:
    """A synthesized sketch as a query would be normalised (blank ones, where S found nothing, stay blank)."""
    try:
        return normalize_sketch(sketch, sketch.shape[0])
    except InputError:
        return sketch


def _dice(labels: np.ndarray, stored: np.ndarray, classes: int) -> float:
    if stored.shape != labels.shape:  # stored at another resolution: compare at the query's
        stored = np.asarray(Image.fromarray(stored).resize(labels.shape[::-1], Image.NEAREST))
    value = dice_per_image(labels, stored, classes).mean
    return 0.0 if np.isnan(value) else value
