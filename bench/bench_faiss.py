"""FAISS search of the archive's vectors: build time, size, latency, throughput and recall, per index kind.

    python bench/bench_faiss.py --sizes 10000,100000,1000000 --threads 2 --out faiss.json

For each database size N and each distribution (`random`: unit Gaussian vectors, uniform on the
sphere; `clustered`: a mixture of `--clusters` Gaussians around random unit centres, renormalised),
N unit vectors of dimension `--dim` (default 640 = sketch field 256 + E's w 128 + C's 256, the cpu bundle) go into
the system's own `indexing.vector_index.VectorIndex`, built as indexing builds it:
  flat   exact inner product
  ivf    ~4 sqrt(N) k-means cells (trained on at most 256 points per cell), each `--nprobe` value
  hnsw   M = 32, efConstruction = 80, each `--ef` value of efSearch
Queries (`--queries`, shuffled): half held-out vectors of the same distribution, half database
vectors plus Gaussian noise of norm `--noise` (renormalised), so every query has true neighbours
and recall@k is meaningful. The truth is the flat index's top k.

Measured per index: build seconds (add, plus k-means training for ivf), index bytes
(faiss.serialize_index), and per search setting single-query latency p50/p95 (`--latency-queries`
queries one at a time, through VectorIndex.search as the search path calls it), batched throughput
(all queries in one call, queries/s), recall@k overall and for the held-out and perturbed halves.
faiss runs with `--threads` OpenMP threads; note that it parallelises these searches over queries,
so a single query runs on one thread.

Reported per (distribution, N): the fastest setting (by p50) with recall@k >= 0.95, and the exact
search bound: N * dim * 4 bytes scanned per query / the measured copy bandwidth (bench/machine.py)
= the least time flat search can take, next to flat's measured p50. `target`: whether the fastest
setting at N = 1,000,000 meets p50 <= 20 ms with recall@10 >= 0.95.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import add_common_arguments, describe, finish, measure_peak, percentiles, set_threads  # noqa: E402
from indexing.vector_index import VectorIndex  # noqa: E402

TARGET = {"n": 1_000_000, "max_p50_ms": 20.0, "min_recall": 0.95}
CHUNK = 100_000  # vectors generated at a time (keeps temporaries small at 1M)


def _ints(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def sample(distribution: str, count: int, dim: int, rng: np.random.Generator, centres: np.ndarray | None, spread: float) -> np.ndarray:
    """`count` unit vectors of the distribution, float32 (count, dim)."""
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, CHUNK):
        stop = min(count, start + CHUNK)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        if distribution == "clustered":
            noise *= spread / np.sqrt(dim)
            noise += centres[rng.integers(len(centres), size=stop - start)]
        out[start:stop] = unit(noise)
    return out


def make_data(distribution: str, n: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(database (n, dim), queries (q, dim), perturbed (q,) bool: which queries are noisy database vectors)."""
    rng = np.random.default_rng([args.seed, n, ["random", "clustered"].index(distribution)])
    centres = unit(rng.standard_normal((args.clusters, args.dim), dtype=np.float32)) if distribution == "clustered" else None
    database = sample(distribution, n, args.dim, rng, centres, args.spread)
    held_out = sample(distribution, args.queries - args.queries // 2, args.dim, rng, centres, args.spread)
    sources = database[rng.choice(n, args.queries // 2, replace=n < args.queries // 2)]
    perturbed = unit(sources + rng.standard_normal(sources.shape, dtype=np.float32) * (args.noise / np.sqrt(args.dim)))
    order = rng.permutation(args.queries)
    flags = np.r_[np.zeros(len(held_out), bool), np.ones(len(perturbed), bool)]
    return database, np.concatenate([held_out, perturbed])[order], flags[order]


def recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query: the share of the true top k among the found top k."""
    return np.array([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)])


def measure(index: VectorIndex, queries: np.ndarray, args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    index.search(queries[:1], args.k)  # warm-up
    latencies = []
    for query in queries[: args.latency_queries]:
        start = time.perf_counter()
        index.search(query[None], args.k)
        latencies.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    _, ids = index.search(queries, args.k)
    seconds = time.perf_counter() - start
    return {"latency_ms": percentiles(latencies), "batch_qps": round(len(queries) / seconds, 1)}, ids


def bench_index(kind: str, database: np.ndarray, queries: np.ndarray, flags: np.ndarray, truth: np.ndarray | None,
                args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    """Build one index, then measure every search setting of its kind; returns its record and its flat ids."""
    start = time.perf_counter()
    index = VectorIndex.build(database, np.arange(len(database)), kind)
    record = {"kind": kind, "build_s": round(time.perf_counter() - start, 3),
              "index_bytes": int(faiss.serialize_index(index.index).nbytes)}
    if kind == "ivf":
        record["nlist"] = int(index.index.nlist)
    settings = {"flat": [{}], "ivf": [{"nprobe": p} for p in args.nprobe], "hnsw": [{"ef_search": e} for e in args.ef]}[kind]
    record["searches"] = []
    ids = np.zeros(0)
    for setting in settings:
        if kind == "ivf" and setting["nprobe"] > index.index.nlist:
            continue
        index.set_search_effort(**setting)
        row, ids = measure(index, queries, args)
        hits = recall(ids, truth if truth is not None else ids)
        row.update(setting=setting, recall=round(float(hits.mean()), 4),
                   recall_heldout=round(float(hits[~flags].mean()), 4), recall_perturbed=round(float(hits[flags].mean()), 4))
        record["searches"].append(row)
    return record, ids


def bench_size(distribution: str, n: int, args: argparse.Namespace, bandwidth_gb_s: float) -> dict:
    database, queries, flags = make_data(distribution, n, args)
    result: dict = {"distribution": distribution, "n": n, "dim": args.dim, "queries": len(queries), "indexes": []}
    truth = None
    for kind in ["flat", *[k for k in args.kinds if k != "flat"]]:  # flat first: it is the truth
        record, ids = bench_index(kind, database, queries, flags, truth, args)
        truth = ids if truth is None else truth
        result["indexes"].append(record)
        gc.collect()
    flat_p50 = result["indexes"][0]["searches"][0]["latency_ms"]["p50"]
    scanned = n * args.dim * 4
    result["flat_bound"] = {"bytes_per_query": scanned, "min_ms": round(scanned / (bandwidth_gb_s * 1e9) * 1000, 3),
                            "measured_p50_ms": flat_p50}
    good = [(row["latency_ms"]["p50"], index["kind"], row) for index in result["indexes"] for row in index["searches"]
            if row["recall"] >= TARGET["min_recall"]]
    if good:
        _, kind, row = min(good, key=lambda item: item[0])
        result["best"] = {"kind": kind, "setting": row["setting"], "latency_ms": row["latency_ms"], "recall": row["recall"]}
    else:
        result["best"] = None
    return result


def run(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    peak = measure_peak(args.threads, args.matmul_size, args.copy_mb)
    results = [bench_size(d, n, args, peak["copy_gb_s"]) for d in args.distributions for n in args.sizes]
    target = {}
    for result in results:
        if result["n"] == TARGET["n"]:
            best = result["best"]
            target[result["distribution"]] = {**TARGET, "met": best is not None and best["latency_ms"]["p50"] <= TARGET["max_p50_ms"],
                                              "best": best}
    return {
        "benchmark": "faiss",
        "config": {key: value for key, value in vars(args).items() if key != "out"},
        "machine": describe(args.threads),
        "peak": peak,
        "results": results,
        "target": target or f"not measured: no size {TARGET['n']} in --sizes",
        "notes": [
            "Random unit vectors are the hardest case for ivf and hnsw: with no structure, a query's true "
            "neighbours are barely closer than everything else, so approximate indexes need much more "
            "effort for the same recall than on real embeddings; `clustered` is a mixture of Gaussians closer "
            "to real embeddings (how close is an assumption, not measured).",
            "faiss parallelises flat, ivf and hnsw search over queries: a single query runs on one thread, "
            "so --threads speeds up batch_qps but not latency_ms.",
            "flat_bound.min_ms = N * dim * 4 bytes / copy bandwidth (2 x bytes of a numpy copy per second, "
            "one thread): the least time one exact scan can take once the database is far larger than the "
            "last-level cache; a database of a few MB is read from cache and can beat it.",
            "latency_ms is through VectorIndex.search (including its normalising copy of the query), as search uses it.",
        ],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_ints, default=[10_000, 100_000, 1_000_000], help="database sizes, comma-separated")
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and batched throughput")
    p.add_argument("--latency-queries", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--kinds", type=lambda s: s.split(","), default=["flat", "ivf", "hnsw"])
    p.add_argument("--nprobe", type=_ints, default=[8, 32, 128, 512])
    p.add_argument("--ef", type=_ints, default=[16, 64, 128, 256, 512])
    p.add_argument("--distributions", type=lambda s: s.split(","), default=["random", "clustered"])
    p.add_argument("--clusters", type=int, default=1024, help="mixture components of `clustered`")
    p.add_argument("--spread", type=float, default=1.0, help="norm of a clustered point's offset from its centre (before renormalising)")
    p.add_argument("--noise", type=float, default=0.5, help="norm of the noise added to database vectors to make queries")
    p.add_argument("--seed", type=int, default=0)
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    unknown = set(args.distributions) - {"random", "clustered"} or set(args.kinds) - {"flat", "ivf", "hnsw"}
    if unknown:
        raise SystemExit(f"unknown distribution or index kind: {', '.join(sorted(unknown))}")
    return finish("bench/bench_faiss.py", argv, args, run(args))


if __name__ == "__main__":
    main()
