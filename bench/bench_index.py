"""Indexing throughput: images/s of `index_folders` with the bundle's `ArchiveEmbedder`, and where the time goes.

    python bench/bench_index.py --bundle BUNDLE --data DATASET_FOLDER --threads 2 --batch-size 32

The images of `--data` (its images/ folder if it has one; the first `--limit` files if given) are
indexed into a new workspace (`--workspace`, default a temporary folder that is deleted afterwards),
exactly as `cli.py index` does (index kind auto), after one untimed warm-up batch through the
networks. With `--threads` torch and faiss threads, `--precision` (as `index --precision`) and
`--compile` (as `index --compile`; the untimed warm-up compiles), this process measures:

  index_run      wall seconds and images/s of the whole `index_folders` call, split into
                 embed (`embed_images`: S, E, C and the fused vector), load (reading and decoding the
                 files for embedding), commit (the catalog transaction, the FAISS add and the periodic
                 index saves) and discover_plan (finding, stat'ing and hashing the files, and the final
                 save). The split comes from a timing wrapper put around `ArchiveEmbedder.embed_images`
                 and from the run's `on_batch` reports (`indexing.ingest.BatchTiming`).
  parts_ms_per_image  the pieces of `retrieval.vector.archive_parts`, timed separately, on the first
                 `--part-images` of the same images in batches of `--batch-size`: S (resize, SOLOv2,
                 masks to sketches and label maps), C (pixels and C.embed), sketch_normalize (each
                 synthesized sketch normalised as a query), E (E on the sketches), field (sketch_field), fuse (fuse_vectors).
  peak_rss_mib   this process's peak RSS, recorded before the machine peak is measured.
  target         >= 20 images/s.

Under torchrun (`torchrun --standalone --nproc-per-node 2 bench/bench_index.py ... --threads 1`)
every rank embeds its share of each batch, as `index` does; rank 0 times the run, times the parts
in batches of its share, and reports every rank's peak RSS at the end of the run
(`peak_rss_mib_per_rank`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import add_common_arguments, describe, finish, measure_peak, peak_rss_mib, set_threads  # noqa: E402
from generation.device import PRECISIONS, init_distributed  # noqa: E402
from generation.images import (
    find_images,  # noqa: E402
    square_resize,  # noqa: E402
)
from generation.sketch import sketch_to_tensor  # noqa: E402
from indexing.files import load  # noqa: E402
from indexing.ingest import BatchTiming, index_folders  # noqa: E402
from retrieval.models import SystemModels  # noqa: E402
from retrieval.vector import ArchiveEmbedder, VectorRecipe, archive_parts, fuse_vectors, normalize_synthesized, sketch_field  # noqa: E402

TARGET_IMAGES_PER_S = 20.0


def index_run(files: list[Path], workspace: Path, embedder: ArchiveEmbedder, batch_size: int) -> dict:
    embed_images, totals = embedder.embed_images, {"embed": 0.0, "load_embed": 0.0, "commit": 0.0}

    def timed_embed_images(images):
        start = time.perf_counter()
        try:
            return embed_images(images)
        finally:
            totals["embed"] += time.perf_counter() - start

    def on_batch(batch: BatchTiming) -> None:
        totals["load_embed"] += batch.embed_s
        totals["commit"] += batch.commit_s

    embedder.embed_images = timed_embed_images
    try:
        start = time.perf_counter()
        summary = index_folders(files, workspace, embedder, batch_size=batch_size, on_batch=on_batch)
        seconds = time.perf_counter() - start
    finally:
        del embedder.embed_images
    split = {"embed": totals["embed"], "load": totals["load_embed"] - totals["embed"], "commit": totals["commit"],
             "discover_plan": seconds - totals["load_embed"] - totals["commit"]}
    return {"images": summary.added, "skipped": len(summary.skipped), "seconds": round(seconds, 3),
            "images_per_s": round(summary.added / seconds, 2),
            "split_s": {key: round(value, 3) for key, value in split.items()},
            "split_ms_per_image": {key: round(value * 1000 / max(summary.added, 1), 3) for key, value in split.items()}}


@torch.no_grad()
def time_parts(models: SystemModels, images: list[np.ndarray], batch_size: int, recipe: VectorRecipe) -> dict[str, float]:
    """ms per image of each piece of `archive_parts` (same code, one timer per piece)."""
    m, size = models, models.resolution
    totals = dict.fromkeys(["S", "C", "sketch_normalize", "E", "field", "fuse"], 0.0)

    def lap(key: str, start: float) -> float:
        now = time.perf_counter()
        totals[key] += now - start
        return now

    for first in range(0, len(images), batch_size):
        batch = images[first : first + batch_size]
        clock = time.perf_counter()
        with m.archive_autocast():
            sketches, _ = m.S.synthesize([square_resize(image, m.S.config.size) for image in batch], size)
        clock = lap("S", clock)
        pixels = torch.from_numpy(np.stack([square_resize(image, size) for image in batch])).permute(0, 3, 1, 2)
        with m.archive_autocast():
            embeddings = m.C.embed(pixels.float().to(m.device) / 127.5 - 1).float()
        clock = lap("C", clock)
        sketches = np.stack([normalize_synthesized(sketch) for sketch in sketches])
        clock = lap("sketch_normalize", clock)
        codes = m.sketch2medi.E(sketch_to_tensor(sketches).to(m.device))
        clock = lap("E", clock)
        fields = sketch_field(sketches)
        clock = lap("field", clock)
        fuse_vectors(fields, codes - m.code_mean, embeddings, recipe)
        lap("fuse", clock)
    return {key: round(value * 1000 / len(images), 3) for key, value in totals.items()}


def run(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    root = args.data / "images" if (args.data / "images").is_dir() else args.data
    files = find_images(root)[: args.limit]
    if not files:
        raise SystemExit(f"{root}: no images")
    if args.workspace is not None and args.workspace.exists() and any(args.workspace.iterdir()):
        raise SystemExit(f"{args.workspace}: not empty; the benchmark indexes into a new workspace")
    ranks = init_distributed()
    models = SystemModels(args.bundle, "cpu", args.precision)
    share = -(-args.batch_size // ranks.world_size)  # the images each rank embeds per batch
    if args.compile:
        models.compile_archive(share)
    embedder = ArchiveEmbedder(models)
    sample = [load(path) for path in files[: args.part_images]]
    archive_parts(models, sample[:share])  # warm-up: allocator, oneDNN primitive caches, compiling
    if ranks.enabled:
        torch.distributed.barrier()
    if not ranks.is_main:  # the other ranks embed their shares of the run, report their memory and stop
        index_folders(files, Path(tempfile.gettempdir()), embedder, batch_size=args.batch_size)
        torch.distributed.all_gather_object([None] * ranks.world_size, peak_rss_mib())
        return {}
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="bench_index_"))
    try:
        run_result = index_run(files, workspace, embedder, args.batch_size)
    finally:
        if args.workspace is None:
            shutil.rmtree(workspace, ignore_errors=True)
    rss_ranks = [peak_rss_mib()]
    if ranks.enabled:
        rss_ranks = [None] * ranks.world_size
        torch.distributed.all_gather_object(rss_ranks, peak_rss_mib())
    parts = time_parts(models, sample, share, embedder.recipe)
    rss = peak_rss_mib()
    return {
        "benchmark": "index",
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key != "out"},
        "machine": describe(args.threads),
        "peak": measure_peak(args.threads, args.matmul_size, args.copy_mb),
        "ranks": ranks.world_size,
        "index_run": run_result,
        "parts_ms_per_image": {**parts, "images": len(sample), "sum": round(sum(parts.values()), 3)},
        "peak_rss_mib": rss,
        "peak_rss_mib_per_rank": rss_ranks,  # at the end of the run, before the per-part timing
        "target": {"min_images_per_s": TARGET_IMAGES_PER_S, "met": run_result["images_per_s"] >= TARGET_IMAGES_PER_S},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="a dataset folder (images/ inside) or a folder of images")
    p.add_argument("--workspace", type=Path, help="a new workspace to keep (default: a temporary one, deleted)")
    p.add_argument("--limit", type=int, help="index only the first N images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--part-images", type=int, default=256, help="images for the per-part timing")
    p.add_argument("--precision", default="float32", choices=PRECISIONS, help="of S and C, as `index --precision`")
    p.add_argument("--compile", action="store_true", help="networks compiled, as `index --compile` (compiled in the untimed warm-up)")
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    result = run(args)
    return finish("bench/bench_index.py", argv, args, result) if result else result


if __name__ == "__main__":
    main()
