"""`demo`: the whole job on a fresh machine with nothing downloaded.

Generates a phantom archive the bundle never saw (another seed than its training phantom), indexes
it, draws a simulated free-hand sketch of one of its images, searches, and writes the contact sheet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from generation.freehand import freehand_sketch
from generation.images import load_mask
from generation.phantom import write_phantom_dataset
from indexing.ingest import IndexSummary, index_folders
from retrieval.contact_sheet import write_search_outputs
from retrieval.models import SystemModels
from retrieval.search import Retriever, SearchResult
from retrieval.vector import ArchiveEmbedder

ARCHIVE_SEED = 20261123  # not the shipped bundle's training seed (0)


@dataclass
class DemoResult:
    target: Path  # the archive image the sketch was drawn from
    sketch: Path  # the simulated free-hand sketch
    rank: int | None  # where the target came in the results (None: not in the top k)
    summary: IndexSummary
    search: SearchResult
    outputs: list[Path]


def run_demo(out: str | Path, bundle: str | Path | None = None, images: int = 200, size: int = 128, strength: float = 0.5,
             k: int = 10, device: str = "auto", log: Callable[[str], None] = print) -> DemoResult:
    out = Path(out)
    models = SystemModels(bundle, device)  # first: an unusable bundle fails before any work
    archive = out / "archive"
    if (archive / "phantom.json").is_file():
        log(f"reusing the phantom archive in {archive} (delete {out} for a new one)")
    else:
        log(f"generating {images} phantom images of {size} px in {archive}")
        write_phantom_dataset(archive, n=images, size=size, seed=ARCHIVE_SEED)
    log(f"indexing {archive / 'images'} with bundle {models.bundle}")
    summary = index_folders(archive / "images", out / "workspace", ArchiveEmbedder(models), batch_size=32)

    # The query: one image's exact mask, drawn by the free-hand simulator as a clinician might.
    target = sorted((archive / "images").glob("*.png"))[len(list((archive / "images").glob("*.png"))) // 2]
    mask = np.asarray(Image.fromarray(load_mask(archive / "masks" / target.name)).resize((256, 256), Image.NEAREST))
    sketch_path = out / "query_sketch.png"
    Image.fromarray(freehand_sketch(mask, strength, np.random.default_rng(ARCHIVE_SEED))).save(sketch_path)
    with Retriever(out / "workspace", models=models) as retriever:
        result = retriever.search(sketch_path, k=k)
    rank = next((hit.rank for hit in result.results if Path(hit.path).resolve() == target.resolve()), None)
    outputs = write_search_outputs(result, out)
    return DemoResult(target, sketch_path, rank, summary, result, outputs)
