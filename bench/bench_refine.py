"""G's four passes and H's three steps (`generation.refiner.refine`), with H's offsets factored
(as search runs them) against full kernels added step by step and convolved as one grouped
convolution per layer, interleaved in one process.

    python bench/bench_refine.py --bundle bundles/phantom --threads 1

Prints, per batch size and form, the minimum and median over `--rounds` of ms per query.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.refiner import refine  # noqa: E402
from generation.registry import load_network  # noqa: E402


def full_kernels(G, H, sketches, w, steps):
    """`refine` with every step's offsets made as (N, out, in, k, k) kernels and added as such."""
    images, total = [G(w)], None
    for _ in range(steps):
        deltas = {name: delta.dense() for name, delta in H(sketches, images[-1]).items()}
        total = deltas if total is None else {name: total[name] + deltas[name] for name in deltas}
        images.append(G(w, weight_deltas=total))
    return images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="bundle with G, E and H")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="H's steps T")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    G, H, E = (load_network(name, args.bundle) for name in ("generator", "refiner", "encoder"))
    size = G.config.resolution
    batches = [int(b) for b in args.batches.split(",")]
    sketches = (torch.rand(max(batches), 1, size, size, generator=torch.Generator().manual_seed(0)) > 0.95).float()
    forms = {"full kernels": full_kernels, "factored": refine}
    times: dict[tuple[int, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for batch in batches:
                drawn = sketches[:batch]
                w = E(drawn)
                repeats = max(1, 8 // batch)
                for name, form in forms.items():
                    start = time.perf_counter()
                    for _ in range(repeats):
                        form(G, H, drawn, w, args.steps)
                    times.setdefault((batch, name), []).append((time.perf_counter() - start) / repeats / batch * 1000)
    report = {f"batch {b}, {name}": {"min_ms": round(min(t), 1), "median_ms": round(statistics.median(t), 1)} for (b, name), t in times.items()}
    for key, value in report.items():
        print(key, value)
    return report


if __name__ == "__main__":
    main()
