"""Sketch search speed and memory: per-stage latency, batched throughput, FLOPs against the machine's peak.

    python bench/bench_search.py --bundle BUNDLE --workspace /tmp/ws10k --archive-size 10000 --threads 2

Archive. With `--archive-size N`, N phantoms (`generation.phantom.write_phantom_dataset`, `--phantom-size`
px, kept next to the workspace in WORKSPACE-phantomN-SIZEpx unless `--archive-dir`) are written if
missing and indexed with `cli.py index` in a child process (OMP_NUM_THREADS = --threads), so indexing
does not count towards this process's memory; `--data FOLDER` indexes a dataset folder instead. Both
are incremental: an archive already in the workspace is only checked. Without either, the workspace
is searched as it is.

Queries. Simulated free-hand sketches (`generation.freehand.freehand_sketch` at 256 px, strengths
cycling through `--strengths`, a seed per query) of the archive's masks (the dataset's masks/
folder, else S's label maps stored in the catalog), passed raw to `Retriever.search`, so the
`normalize` stage does a user sketch's work. `--warmup` searches are not timed.

Measured (this process, `--threads` torch and faiss threads):
  stages_ms      p50/p95/mean of each stage of `timings_ms` (normalize, E, G, H1..HT, C, faiss, S,
                 rerank, total) over `--queries` searches; end_to_end_ms: the wall time of the call.
  batched        queries/s of normalise + `generator.generate` (batches of `--batch`) + C + fused
                 vectors + one FAISS batch search (no DICE re-ranking), over the same queries.
  flops          FLOPs of each network stage for one query (torch.utils.flop_counter, a multiply-add
                 = 2), and the time each would take at the measured matmul peak (bench/machine.py);
                 peak_fraction = that time / the stage's p50. For faiss, the exact-scan bound
                 ntotal * dim * 4 bytes / copy bandwidth.
  peak_rss_mib   this process's peak RSS (getrusage), recorded before the machine peak is measured.
  target         10k images, cpu bundle, 2 threads: search p50 <= 200 ms and peak RSS < 1.5 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import add_common_arguments, describe, finish, measure_peak, peak_rss_mib, percentiles, set_threads  # noqa: E402
from generation.dataset import ImageDataset  # noqa: E402
from generation.errors import InputError
from generation.freehand import freehand_sketch  # noqa: E402
from generation.images import tensor_to_images  # noqa: E402
from generation.phantom import write_phantom_dataset  # noqa: E402
from generation.refiner import accumulate  # noqa: E402
from generation.sketch import sketch_to_tensor  # noqa: E402
from retrieval.models import SystemModels  # noqa: E402
from retrieval.search import Retriever, load_sketch  # noqa: E402
from retrieval.vector import fuse_vectors, sketch_field  # noqa: E402

TARGET = {"archive_images": 10_000, "threads": 2, "max_p50_ms": 200.0, "max_rss_mib": 1536.0}
SKETCH_SIZE = 256  # free-hand sketches are drawn at this size (as in retrieval.evaluate), then normalised


def prepare_archive(args: argparse.Namespace) -> tuple[Path | None, float | None]:
    """(the dataset folder indexed, seconds the index run took), or (None, None) without one."""
    folder = args.data
    if args.archive_size:
        folder = args.archive_dir or Path(f"{args.workspace}-phantom{args.archive_size}-{args.phantom_size}px")
        meta = folder / "phantom.json"
        have = json.loads(meta.read_text()) if meta.is_file() else {}
        if (have.get("n"), have.get("size"), have.get("seed")) != (args.archive_size, args.phantom_size, args.seed) \
                or len(list((folder / "images").glob("*.png"))) != args.archive_size:
            write_phantom_dataset(folder, args.archive_size, args.phantom_size, args.seed)
    if folder is None:
        return None, None
    images = folder / "images" if (folder / "images").is_dir() else folder
    command = [sys.executable, str(ROOT / "cli.py"), "index", str(images), "--workspace", str(args.workspace),
               "--bundle", str(args.bundle), "--device", "cpu", "--batch-size", str(args.index_batch_size)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"indexing failed ({' '.join(command)}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return folder, time.perf_counter() - start


def query_masks(retriever: Retriever, folder: Path | None, count: int, seed: int) -> list[np.ndarray]:
    """Up to `count` class masks at SKETCH_SIZE px: the dataset's own, else S's label maps from the catalog."""
    rng = np.random.default_rng(seed)
    dataset = ImageDataset(folder) if folder is not None else None
    if dataset is not None and dataset.has_masks:
        picks = rng.choice(len(dataset), min(count, len(dataset)), replace=False)
        return [dataset.mask(int(i), SKETCH_SIZE) for i in picks]
    ids = retriever.workspace.catalog.ids()
    maps = retriever.workspace.masks_for(rng.choice(ids, min(count, len(ids)), replace=False))
    return [np.asarray(Image.fromarray(m).resize((SKETCH_SIZE, SKETCH_SIZE), Image.NEAREST)) for m in maps.values()]


def make_sketches(masks: list[np.ndarray], count: int, strengths: list[float], seed: int, resolution: int) -> list[np.ndarray]:
    """`count` raw free-hand drawings (uint8, SKETCH_SIZE px) cycling over masks and strengths; blank ones skipped."""
    sketches: list[np.ndarray] = []
    for i in range(count * 4):
        if len(sketches) == count:
            break
        drawing = freehand_sketch(masks[i % len(masks)], strengths[i % len(strengths)], np.random.default_rng([seed, i]))
        try:
            load_sketch(drawing, resolution)
        except InputError:  # nothing drawn (an image without structures)
            continue
        sketches.append(drawing)
    if not sketches:
        raise SystemExit("no query sketch could be drawn: the masks are empty")
    return sketches


def time_searches(retriever: Retriever, warmup: list[np.ndarray], sketches: list[np.ndarray],
                  args: argparse.Namespace) -> tuple[dict, dict]:
    for sketch in warmup:
        retriever.search(sketch, args.k, args.candidates, steps=args.steps)
    stages: dict[str, list[float]] = {}
    wall = []
    for sketch in sketches:
        start = time.perf_counter()
        result = retriever.search(sketch, args.k, args.candidates, steps=args.steps)
        wall.append((time.perf_counter() - start) * 1000)
        for stage, ms in result.timings_ms.items():
            stages.setdefault(stage, []).append(ms)
    return {stage: percentiles(values) for stage, values in stages.items()}, percentiles(wall)


@torch.no_grad()
def batched_qps(retriever: Retriever, sketches: list[np.ndarray], args: argparse.Namespace) -> float:
    """Queries/s of normalise + generate (batches of args.batch) + C + sketch field + fused vectors + FAISS batch search."""
    m = retriever.models
    m.sketch2medi.generate(np.stack([load_sketch(s, m.resolution) for s in sketches[: args.batch]]), args.steps, args.batch)
    start = time.perf_counter()
    for first in range(0, len(sketches), args.batch):
        canonical = np.stack([load_sketch(s, m.resolution) for s in sketches[first : first + args.batch]])
        generation = m.sketch2medi.generate(canonical, args.steps, args.batch)
        vectors = fuse_vectors(sketch_field(canonical), generation.w.to(m.device) - m.code_mean,
                               m.C.embed(generation.images.to(m.device)), retriever.embedder.recipe)
        retriever.workspace.index.search(vectors, args.candidates)
    return len(sketches) / (time.perf_counter() - start)


@torch.no_grad()
def count_flops(models: SystemModels, canonical: np.ndarray, steps: int) -> dict[str, int]:
    """FLOPs per stage for one query, stage names as in `timings_ms`."""
    model, flops = models.sketch2medi, {}

    def count(stage: str, run):
        with FlopCounterMode(display=False) as counter:
            out = run()
        flops[stage] = int(counter.get_total_flops())
        return out

    sketch = sketch_to_tensor(canonical).to(models.device)
    w = count("E", lambda: model.E(sketch))
    image = count("G", lambda: model.G(w))
    total = None
    for t in range(1, steps + 1):
        def step(image=image, total=total):
            deltas = accumulate(total, model.H(sketch, image))
            return deltas, model.G(w, weight_deltas=deltas)

        total, image = count(f"H{t}", step)
    count("C", lambda: models.C.embed(image))
    count("S", lambda: models.S.predict_label_map([tensor_to_images(image)[0]]))
    return flops


def run(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    folder, index_s = prepare_archive(args)
    models = SystemModels(args.bundle, "cpu")
    steps = models.sketch2medi.default_steps if args.steps is None else args.steps
    args.steps = steps
    with Retriever(args.workspace, models=models) as retriever:
        ntotal, dim = retriever.workspace.index.ntotal, retriever.workspace.index.dim
        drawings = make_sketches(query_masks(retriever, folder, args.queries, args.seed), args.queries + args.warmup,
                                 args.strengths, args.seed, models.resolution)
        untimed = min(args.warmup, len(drawings) - 1)
        warmup, sketches = drawings[:untimed], drawings[untimed:]
        flops = count_flops(models, load_sketch(sketches[0], models.resolution), steps)  # on the eager networks
        if args.compile:
            models.compile()  # compiled during the warm-up searches
        stages, end_to_end = time_searches(retriever, warmup, sketches, args)
        qps = batched_qps(retriever, sketches, args)
        index_kind = retriever.workspace.index.kind
    rss = peak_rss_mib()
    peak = measure_peak(args.threads, args.matmul_size, args.copy_mb)
    bound = {}
    for stage, value in flops.items():
        at_peak_ms = value / (peak["matmul_gflops"] * 1e9) * 1000
        measured = stages.get(stage, {}).get("p50")
        bound[stage] = {"gflop": round(value / 1e9, 4), "at_peak_ms": round(at_peak_ms, 3),
                        "peak_fraction": round(at_peak_ms / measured, 4) if measured else None}
    scan_ms = ntotal * dim * 4 / (peak["copy_gb_s"] * 1e9) * 1000
    bound["faiss"] = {"bytes_scanned_flat": ntotal * dim * 4, "at_bandwidth_ms": round(scan_ms, 3), "index_kind": index_kind}
    applies = ntotal >= TARGET["archive_images"] and args.threads == TARGET["threads"]
    return {
        "benchmark": "search",
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key != "out"},
        "machine": describe(args.threads),
        "peak": peak,
        "model": {"bundle_id": models.bundle_id, "resolution": models.resolution, "steps": steps},
        "archive": {"images": ntotal, "dim": dim, "index_kind": index_kind, "folder": str(folder) if folder else None,
                    "index_run_s": round(index_s, 2) if index_s is not None else None},
        "queries": len(sketches),
        "stages_ms": stages,
        "end_to_end_ms": end_to_end,
        "batched": {"batch": args.batch, "queries_per_s": round(qps, 2),
                    "includes": "normalize, E, G, H, C, faiss; no S / DICE re-ranking"},
        "flops": bound,
        "peak_rss_mib": rss,
        "target": {**TARGET, "applies": applies, "p50_met": stages["total"]["p50"] <= TARGET["max_p50_ms"],
                   "rss_met": rss < TARGET["max_rss_mib"]},
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--archive-size", type=int, help="index this many phantoms into the workspace first")
    p.add_argument("--phantom-size", type=int, default=128, choices=(64, 128, 256))
    p.add_argument("--archive-dir", type=Path, help="where the phantoms go (default: WORKSPACE-phantomN-SIZEpx)")
    p.add_argument("--data", type=Path, help="a dataset folder to index instead of phantoms")
    p.add_argument("--index-batch-size", type=int, default=32)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--strengths", type=lambda s: [float(v) for v in s.split(",")], default=[0.25, 0.5, 0.75, 1.0])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--steps", type=int, help="refinement steps (default: the bundle's)")
    p.add_argument("--batch", type=int, default=16, help="batch size of the batched-throughput measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="search with the networks compiled (`SystemModels.compile`)")
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    return finish("bench/bench_search.py", argv, args, run(args))


if __name__ == "__main__":
    main()
