"""The search vector: the format shared by indexing (archive images) and search (queries).

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
The default weights were chosen on validation splits (docs/RESULTS.md, section "Sketches drawn
from memory"): with the 64 px `cpu` bundles the field alone finds the right image more often than
E's code or C's view of x_hat alone, but a quarter of the weight on E's code brings it into the
first stage's candidates far more often when the drawing drifts, and C's view adds nothing.
Archive sketches go through the same normalisation as queries before E, so a query that is an
archive image's own synthesized sketch gets exactly that image's code and field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from generation.bundle import SEARCH_DEFAULTS
from generation.errors import InputError
from generation.images import square_resize
from generation.normalize import normalize_sketch
from generation.sketch import INK, sketch_to_tensor
from indexing.embedding import EmbeddedBatch
from retrieval.defaults import DEFAULT_WEIGHTS
from retrieval.models import SystemModels

RECIPE_SEPARATOR = ":vector="
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


def bundle_recipe(models: SystemModels) -> VectorRecipe:
    """The vector weights a new workspace of this bundle gets: its `search.json`'s, else the defaults."""
    path = models.bundle / SEARCH_DEFAULTS  # {"vector_weights": "sketch=..,code=..,image=..", "chosen_on": ...}
    if not path.is_file():
        return VectorRecipe()
    try:
        return VectorRecipe.parse(str(json.loads(path.read_text())["vector_weights"]))
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: expected {{\"vector_weights\": \"sketch=A,code=B,image=C\"}} ({error}); fix or delete it") from None


class ArchiveEmbedder:
    """The `indexing.embedding.Embedder` of a bundle: per image S's masks, x_sk = S(x), its field f,
    w = E(x_sk), e = C(x), and the fused vector (`recipe`, default: the bundle's, `bundle_recipe`)."""

    def __init__(self, models: SystemModels, recipe: VectorRecipe | None = None):
        self.models, self.recipe = models, recipe or bundle_recipe(models)
        self.bundle_path = str(models.bundle)
        # The vector recipe is part of the id: a workspace is only searched the way it was indexed.
        self.bundle_id = f"{models.bundle_id}{RECIPE_SEPARATOR}{self.recipe.tag}"
        self.dim = FIELD_GRID**2 + models.sketch2medi.G.config.w_dim + models.C.embedding_dim

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

    def __getitem__(self, rows: slice) -> ArchiveParts:
        return ArchiveParts(self.embeddings[rows], self.codes[rows], self.fields[rows], self.labels[rows], self.sketches[rows])

    @staticmethod
    def concat(parts: list[ArchiveParts]) -> ArchiveParts:
        return ArchiveParts(torch.cat([p.embeddings for p in parts]), torch.cat([p.codes for p in parts]),
                            torch.cat([p.fields for p in parts]), np.concatenate([p.labels for p in parts]),
                            np.concatenate([p.sketches for p in parts]))


@torch.no_grad()
def archive_parts(models: SystemModels, images: list[np.ndarray]) -> ArchiveParts:
    """What indexing computes per archive image (any size; centre-cropped to a square, as in training).

    With S and C compiled for batches of `models.archive_batch` (`SystemModels.compile_archive`),
    the images go through in batches of exactly that size, the last one padded with copies of its
    last image (dropped from the result), so that they compile once.
    """
    batch = models.archive_batch
    if batch is not None and images and len(images) != batch:
        if len(images) > batch:
            return ArchiveParts.concat([archive_parts(models, images[start : start + batch]) for start in range(0, len(images), batch)])
        return archive_parts(models, images + [images[-1]] * (batch - len(images)))[: len(images)]
    m, size = models, models.resolution
    pixels = torch.from_numpy(np.stack([square_resize(image, size) for image in images])).permute(0, 3, 1, 2)
    with m.archive_autocast():
        sketches, labels = m.S.synthesize([square_resize(image, m.S.config.size) for image in images], size)
        embeddings = m.C.embed(pixels.float().to(m.device) / 127.5 - 1)
    sketches = np.stack([normalize_synthesized(sketch) for sketch in sketches])
    codes = m.sketch2medi.E(sketch_to_tensor(sketches).to(m.device))
    return ArchiveParts(embeddings.float().cpu(), codes.cpu(), sketch_field(sketches), labels, sketches)


def normalize_synthesized(sketch: np.ndarray) -> np.ndarray:
    """A synthesized sketch as a query would be normalised (blank ones, where S found nothing, stay blank)."""
    try:
        return normalize_sketch(sketch, sketch.shape[0])
    except InputError:
        return sketch
