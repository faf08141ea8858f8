"""Memory of an index run on large images: the peak resident memory of `cli.py index` for one
8000^2 PNG, eight 4096^2 PNGs and eight 4096^2 JPEGs (the target: under 1 GB in each), beside that
of one 256^2 PNG (the process with its models).

    python bench/bench_index_memory.py --bundle bundles/phantom [--side 8000] [--batch-side 4096] [--json]

Each archive is made of phantom images upscaled to the side, in a temporary folder; each is indexed
into a fresh workspace by `cli.py index` in a subprocess (one torch thread, the default batch of 32,
so the eight images are one batch), whose RSS is read from /proc every 20 ms. Reports the peak RSS
and the run's time per archive.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_server_memory import RssSampler  # noqa: E402
from generation.phantom import write_phantom_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 1024


def upscaled_archive(archive: Path, count: int, side: int, suffix: str) -> Path:
    """`count` distinct phantom images upscaled to side x side, saved as `suffix` files in `archive`."""
    source = archive.parent / f"phantom_{count}"
    if not source.exists():
        write_phantom_dataset(source, n=count, size=256, seed=1)
    archive.mkdir()
    for i, path in enumerate(sorted((source / "images").glob("*.png"))[:count]):
        image = Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC)
        image.save(archive / f"large_{i}{suffix}", **({"quality": 90} if suffix == ".jpg" else {}))
    return archive


def index_peak(archive: Path, workspace: Path, bundle: Path, threads: int) -> dict:
    """Peak RSS (MB) and wall time of `cli.py index archive` into a new workspace."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "index", str(archive), "--workspace", str(workspace),
                                "--bundle", str(bundle), "--device", "cpu"],
                               cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(process.pid).start()
    output, _ = process.communicate()
    peak = sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"cli.py index failed ({process.returncode}):\n{output}")
    return {"images": len(list(archive.iterdir())), "peak_rss_mb": peak, "seconds": round(time.perf_counter() - began, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--side", type=int, default=8000, help="Side in pixels of the single large image.")
    parser.add_argument("--batch-side", type=int, default=4096, help="Side in pixels of each image of the batches of eight.")
    parser.add_argument("--count", type=int, default=8, help="Images in each batch archive.")
    parser.add_argument("--threads", type=int, default=1, help="Torch (OpenMP) threads of the index run.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args(argv)

    runs = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        archives = [("1 x 256^2 PNG", 1, 256, ".png"), (f"1 x {args.side}^2 PNG", 1, args.side, ".png"),
                    (f"{args.count} x {args.batch_side}^2 PNG", args.count, args.batch_side, ".png"),
                    (f"{args.count} x {args.batch_side}^2 JPEG", args.count, args.batch_side, ".jpg")]
        for number, (name, count, side, suffix) in enumerate(archives):
            archive = upscaled_archive(folder / f"archive_{number}", count, side, suffix)
            runs[name] = index_peak(archive, folder / f"workspace_{number}", args.bundle, args.threads)
    report = {"benchmark": "index_memory", "runs": runs, "target_mb": TARGET_MB,
              "met": max(run["peak_rss_mb"] for run in runs.values()) < TARGET_MB}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for name, run in runs.items():
            print(f"{name}: peak {run['peak_rss_mb']} MB in {run['seconds']} s")
        print(f"target under {TARGET_MB} MB: {'met' if report['met'] else 'NOT met'}")
    return report


if __name__ == "__main__":
    main()
