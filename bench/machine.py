"""What the benchmarks ran on, and how fast that machine can go at best.

    python bench/machine.py --threads 2            # the description and the measured peaks, as JSON

`describe(threads)`: CPU model, logical and usable cores, the thread count the benchmark uses, RAM,
load average when it started, and the torch / numpy / faiss versions.

`measure_peak(threads)`: two measured ceilings that the benchmarks compare their stages against:
  matmul_gflops  float32 torch.mm of two n x n matrices (2 n^3 FLOP each) at `threads` threads, the
                 best of `repeats` runs: what dense network layers can reach at most.
  copy_gb_s      np.copyto of a `copy_mb` MB float32 array into another, counted as 2 x size bytes
                 (read + write) per copy, best of `repeats`: a single-thread memory-bandwidth estimate
                 (numpy copies on one thread; a faiss query of batch 1 also scans on one thread).
Both allocate (copy_mb x 2 MB for the copy), so the benchmarks measure them after recording their
own peak RSS.

Also the shared helpers: thread settings for torch and faiss, percentiles, peak RSS, JSON output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def set_threads(threads: int) -> None:
    """The same thread count for torch's intra-op pool and faiss's OpenMP."""
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(threads: int) -> dict:
    import faiss

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "threads": threads,
        "ram_gb": round(ram / 1e9, 1),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "platform": platform.platform(),
    }


def measure_peak(threads: int, matmul_size: int = 2048, copy_mb: int = 512, repeats: int = 5) -> dict:
    """Measured float32 matmul GFLOP/s at `threads` threads and single-thread copy bandwidth (GB/s)."""
    return {"matmul_gflops": round(matmul_gflops(threads, matmul_size, repeats), 1), "matmul_size": matmul_size,
            "copy_gb_s": round(copy_gb_s(copy_mb, repeats), 2), "copy_mb": copy_mb}


def matmul_gflops(threads: int, size: int, repeats: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)  # warm-up
        return 2 * size**3 / min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e9
    finally:
        torch.set_num_threads(previous)


def copy_gb_s(megabytes: int, repeats: int) -> float:
    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.zeros_like(source)
    np.copyto(target, source)  # the target's pages exist before timing
    return 2 * source.nbytes / min(_seconds(lambda: np.copyto(target, source)) for _ in range(repeats)) / 1e9


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def percentiles(values_ms: list[float]) -> dict[str, float]:
    """p50 / p95 / mean of milliseconds (p95 by linear interpolation, as numpy computes it)."""
    values = np.asarray(values_ms, np.float64)
    if not len(values):
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan")}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3),
            "mean": round(float(values.mean()), 3)}


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (children not included), MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 1024 if sys.platform != "darwin" else peak / 2**20, 1)  # KiB on Linux, bytes on macOS


def emit(result: dict, out: Path | None) -> None:
    """The result as JSON on stdout, and into `out` when given."""
    text = json.dumps(result, indent=1)
    print(text)
    if out is not None:
        Path(out).write_text(text + "\n")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark shares: threads, the peak measurements' sizes, the output file."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048, help="bench/machine.py peak measurement")
    parser.add_argument("--copy-mb", type=int, default=512, help="bench/machine.py bandwidth measurement")
    parser.add_argument("--out", type=Path)


def finish(script: str, argv: list[str] | None, args: argparse.Namespace, result: dict) -> dict:
    """The result with the command that made it, emitted (stdout, and --out)."""
    result = {"command": " ".join([f"python {script}", *(sys.argv[1:] if argv is None else argv)]), **result}
    emit(result, args.out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    args = parser.parse_args()
    emit({"machine": describe(args.threads), "peak": measure_peak(args.threads, args.matmul_size, args.copy_mb)}, args.out)


if __name__ == "__main__":
    main()
