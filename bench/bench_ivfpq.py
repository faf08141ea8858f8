"""The ivfpq index at millions of vectors: build time, peak RSS, bytes per vector, latency and recall.

    python bench/bench_ivfpq.py --sizes 1000000 --threads 2 --scratch /tmp/ivfpq-bench --out ivfpq.json
    python bench/bench_ivfpq.py --sizes 1000000 --workspace WORKSPACE --scratch /tmp/ivfpq-bench

For each database size N and each source, N unit vectors of dimension `--dim` (default 640, the
`cpu` bundle's) are generated `--chunk` at a time into a raw float32 file under `--scratch` (never
all in RAM: 10M vectors are 25.6 GB), standing in for the catalog:
  clustered  a mixture of `--clusters` Gaussians around random unit centres (as bench_faiss.py)
  real       the vectors of an indexed archive (`--workspace`: its catalog) cycled and each moved
             by Gaussian noise of norm `--real-noise`, renormalised; each copy keeps its image's
             stored masks (S's), so the searches are also re-ranked by DICE as search re-ranks them
The index is built as indexing builds a large archive (`indexing.vector_index.VectorIndex.trained`
on a random sample of `training_size` vectors, then `add` chunk by chunk), saved, and loaded back
as search loads it (the inverted lists mapped from the file). Queries (`--queries`): half held-out
vectors of the source, half database vectors plus noise of norm `--noise`. The truth is an exact
top-k by a chunked brute-force scan of the file. Searches re-score their candidates with the exact
vectors read from the file (as search reads them from the catalog), for each `--refine` value
(1: the codes' estimates alone) and each `--nprobe` value. For the real source, each setting is
also searched as search does: `--candidates` hits re-ranked by lambda x similarity + (1 - lambda) x
DICE / 100 with the query image's masks (`retrieval.rerank`; the alignment term needs the sketch,
so it is left out), and compared with the same re-ranking of the exact top `--candidates`.

Measured per (source, N): build seconds (train, add), the index file's bytes per vector, peak RSS
after building and, separately, the RSS added by loading and searching the mapped file; per setting
single-query latency p50/p95 (`--latency-queries` one at a time, through VectorIndex.search) and
recall@k (and for the real source, the candidate search's latency and recall@k after the re-rank).
faiss runs with `--threads` threads; a single query runs on one.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import add_common_arguments, describe, finish, peak_rss_mib, percentiles, set_threads  # noqa: E402
from indexing.vector_index import VectorIndex, training_size  # noqa: E402
from indexing.workspace import open_workspace_for_search  # noqa: E402
from retrieval.defaults import DEFAULT_CANDIDATES, DEFAULT_LAMBDA  # noqa: E402
from retrieval.metrics import dice_matrix  # noqa: E402
from retrieval.rerank import rerank_score  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def unit(vectors: np.ndarray) -> np.ndarray:
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def rss_mib() -> dict[str, float]:
    """Current anonymous and file-backed (mapped files) resident memory, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            name, value = line.split(":")
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def archive_vectors_and_masks(workspace: Path) -> tuple[np.ndarray, np.ndarray]:
    """An indexed archive's vectors (M, dim) and S's label maps (M, H, W) uint8, in id order."""
    opened = open_workspace_for_search(workspace)
    try:
        ids, vectors = opened.catalog.vectors()
        maps = opened.masks_for(ids.tolist())
    finally:
        opened.close()
    if not len(ids):
        raise SystemExit(f"{workspace}: the catalog holds no vectors; index an archive into it first")
    shape = next(iter(maps.values())).shape if maps else (1, 1)
    masks = np.stack([maps.get(int(i), np.zeros(shape, np.uint8)) for i in ids])
    return unit(vectors.astype(np.float32)), masks


def reranked_top(queries: np.ndarray, query_masks: np.ndarray, candidates: np.ndarray, vectors: "VectorFile", masks: np.ndarray,
                 k: int, lam: float) -> np.ndarray:
    """Each query's top k of its candidates (ids, -1 = none) by search's re-ranking score, with the
    exact similarity and the DICE of the candidate's masks (database row i has masks[i % M]) with the
    query's; ties go to the lower id, as in search."""
    classes = int(max(masks.max(), query_masks.max())) + 1
    top = np.full((len(queries), k), -1, np.int64)
    for q, row in enumerate(candidates):
        ids = np.unique(row[row >= 0])
        if not len(ids):
            continue
        ids, stored = vectors.rows(ids)
        dice = np.nan_to_num(dice_matrix(query_masks[q][None], masks[ids % len(masks)], classes)[0])
        score = rerank_score(stored @ queries[q], dice, lam)
        order = np.lexsort((ids, -score))[:k]
        top[q, : len(order)] = ids[order]
    return top


def one_at_a_time(index: VectorIndex, queries: np.ndarray, k: int) -> dict:
    """Latency percentiles (ms) of searching `queries` one by one for k hits."""
    latencies = []
    for query in queries:
        begin = time.perf_counter()
        index.search(query[None], k)
        latencies.append((time.perf_counter() - begin) * 1000)
    return percentiles(latencies)


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each truth row (ids >= 0) that the found row holds."""
    return round(float(np.mean([len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)])), 4)


class Source:
    """Unit vectors of one source, drawn `count` at a time from a seeded generator."""

    def __init__(self, name: str, args: argparse.Namespace, n: int):
        self.name, self.args = name, args
        self.rng = np.random.default_rng([args.seed, n, ["clustered", "real"].index(name)])
        if name == "clustered":
            self.centres = unit(self.rng.standard_normal((args.clusters, args.dim), dtype=np.float32))
        else:
            self.real, self.masks = archive_vectors_and_masks(args.workspace)
            if self.real.shape[1] != args.dim:
                raise SystemExit(f"{args.workspace}: its vectors have {self.real.shape[1]} dimensions; pass --dim {self.real.shape[1]}")
            self.next_row = 0

    def draw(self, count: int) -> np.ndarray:
        noise = self.rng.standard_normal((count, self.args.dim), dtype=np.float32)
        if self.name == "clustered":
            noise *= self.args.spread / np.sqrt(self.args.dim)
            return unit(noise + self.centres[self.rng.integers(len(self.centres), size=count)])
        rows = (self.next_row + np.arange(count)) % len(self.real)
        self.next_row += count
        noise *= self.args.real_noise / np.sqrt(self.args.dim)
        return unit(noise + self.real[rows])


class VectorFile:
    """The database vectors in a raw float32 file: written in chunks, read by rows or by chunks."""

    def __init__(self, path: Path, dim: int):
        self.path, self.dim, self.row = path, dim, dim * 4

    def write(self, source: Source, n: int, chunk: int) -> None:
        with open(self.path, "wb") as handle:
            for start in range(0, n, chunk):
                source.draw(min(chunk, n - start)).tofile(handle)

    def chunk(self, start: int, count: int) -> np.ndarray:
        return np.fromfile(self.path, np.float32, count * self.dim, offset=start * self.row).reshape(-1, self.dim)

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids sorted, their vectors), as Catalog.vectors returns them: read row by row (pread)."""
        ids = np.unique(np.asarray(ids, np.int64))
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            data = b"".join(os.pread(descriptor, self.row, int(i) * self.row) for i in ids)
        finally:
            os.close(descriptor)
        return ids, np.frombuffer(data, np.float32).reshape(-1, self.dim)


def exact_top(vectors: VectorFile, n: int, queries: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """The exact top-k ids of each query, by a brute-force scan of the file chunk by chunk."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    for start in range(0, n, chunk):
        scores = queries @ vectors.chunk(start, min(chunk, n - start)).T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_ids = np.concatenate([best_ids, top + start], axis=1)
        order = np.argsort(-merged_scores, axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(merged_scores, order, 1), np.take_along_axis(merged_ids, order, 1)
    return best_ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return round(float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)])), 4)


def bench_size(name: str, n: int, args: argparse.Namespace) -> dict:
    args.scratch.mkdir(parents=True, exist_ok=True)
    vectors, index_path = VectorFile(args.scratch / f"{name}-{n}.f32", args.dim), args.scratch / f"{name}-{n}.faiss"
    source = Source(name, args, n)
    start = time.perf_counter()
    vectors.write(source, n, args.chunk)
    generate_s = time.perf_counter() - start
    held_out = source.draw(args.queries - args.queries // 2)
    rng = np.random.default_rng([args.seed, n])
    picked_ids, picked = vectors.rows(rng.choice(n, args.queries // 2, replace=False))
    perturbed = unit((picked + rng.standard_normal(picked.shape, dtype=np.float32) * (args.noise / np.sqrt(args.dim))).astype(np.float32))
    order = rng.permutation(args.queries)
    queries = np.concatenate([held_out, perturbed])[order]
    rerank = name == "real"
    wide_k = max(args.k, args.candidates) if rerank else args.k
    start = time.perf_counter()
    truth_wide = exact_top(vectors, n, queries, wide_k, args.chunk)
    truth = truth_wide[:, : args.k]
    truth_s = time.perf_counter() - start
    if rerank:  # the masks of each query's image: held-out copies continue the database's cycle of rows
        rows = np.concatenate([n + np.arange(len(held_out)), picked_ids])[order] % len(source.masks)
        query_masks = source.masks[rows]
        truth_reranked = reranked_top(queries, query_masks, truth_wide, vectors, source.masks, args.k, DEFAULT_LAMBDA)

    start = time.perf_counter()
    sample_ids = np.sort(rng.permutation(n)[: training_size("ivfpq", n)])
    index = VectorIndex.trained("ivfpq", vectors.rows(sample_ids)[1], n, args.dim)
    train_s = time.perf_counter() - start
    for first in range(0, n, args.chunk):
        chunk = vectors.chunk(first, min(args.chunk, n - first))
        index.add(chunk, np.arange(first, first + len(chunk)), known_new=True)
    build_s = time.perf_counter() - start
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index.index))
    index.save(index_path)
    record = {"source": name, "n": n, "dim": args.dim, "nlist": int(ivf.nlist), "code_bytes": int(ivf.code_size),
              "generate_s": round(generate_s, 1), "exact_scan_s": round(truth_s, 1), "train_s": round(train_s, 1),
              "build_s": round(build_s, 1), "build_peak_rss_mib": peak_rss_mib(), "build_rss_mib": rss_mib(),
              "file_bytes": index_path.stat().st_size, "bytes_per_vector": round(index_path.stat().st_size / n, 1)}
    if rerank:
        record["archive_images"] = len(source.real)
    del index, ivf
    gc.collect()
    before = rss_mib()
    loaded = VectorIndex.load(index_path, exact_vectors=vectors.rows)
    record["searches"] = []
    for refine in args.refine:
        for nprobe in args.nprobe:
            loaded.set_search_effort(nprobe=nprobe, refine=refine)
            loaded.search(queries[:1], args.k)  # warm-up
            latency = one_at_a_time(loaded, queries[: args.latency_queries], args.k)
            _, found = loaded.search(queries, args.k)
            row = {"nprobe": nprobe, "refine": refine, "latency_ms": latency, "recall": recall(found, truth)}
            if rerank:
                row["candidates_latency_ms"] = one_at_a_time(loaded, queries[: args.latency_queries], args.candidates)
                _, candidates = loaded.search(queries, args.candidates)
                row["recall_reranked"] = overlap(reranked_top(queries, query_masks, candidates, vectors, source.masks, args.k, DEFAULT_LAMBDA),
                                                 truth_reranked)
            record["searches"].append(row)
    after = rss_mib()
    record["search_rss_added_mib"] = {key: round(after[key] - before[key], 1) for key in after}
    if not args.keep:
        vectors.path.unlink()
        index_path.unlink()
    return record


def run(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    sources = args.sources or ["clustered"] + (["real"] if args.workspace else [])
    if "real" in sources and not args.workspace:
        raise SystemExit("--sources real: name the indexed archive with --workspace")
    results = []
    for n in args.sizes:
        for name in sources:
            results.append(bench_size(name, n, args))
            print(results[-1], file=sys.stderr, flush=True)
    return {
        "benchmark": "ivfpq",
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items() if key != "out"},
        "machine": describe(args.threads),
        "results": results,
        "notes": [
            "bytes_per_vector: the saved index file (codes, ids, the OPQ rotation, the cells' centroids and codebooks) / N.",
            "refine 1: the codes' estimated scores alone; refine r: the top r x k candidates re-scored with the exact "
            "vectors, read row by row from the vector file (search reads them from the catalog).",
            "real source only: candidates_latency_ms, one query at a time asking for --candidates hits; recall_reranked, the "
            "top k after search's DICE re-rank (no alignment term) of those candidates against the same re-rank of the exact top --candidates.",
            "search_rss_added_mib: resident memory added by loading the index (lists mapped from the file, RssFile) "
            "and running every search setting.",
        ],
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_ints, default=[100_000, 1_000_000], help="database sizes, comma-separated")
    p.add_argument("--dim", type=int, default=640, help="vector dimension (640: sketch field 256 + E's w 128 + C's 256)")
    p.add_argument("--queries", type=int, default=500, help="queries for recall")
    p.add_argument("--latency-queries", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="hits re-ranked by DICE (real source), as search")
    p.add_argument("--nprobe", type=_ints, default=[8, 16, 32, 64], help="cells visited per query, comma-separated")
    p.add_argument("--refine", type=_ints, default=[1, 4, 10], help="candidates re-scored exactly per hit, comma-separated")
    p.add_argument("--clusters", type=int, default=1024, help="mixture components of `clustered`")
    p.add_argument("--spread", type=float, default=1.0, help="norm of a clustered point's offset from its centre (before renormalising)")
    p.add_argument("--noise", type=float, default=0.5, help="norm of the noise added to database vectors to make queries")
    p.add_argument("--sources", type=lambda text: [part for part in text.split(",") if part], default=None,
                   help="clustered,real (default: clustered, and real with --workspace)")
    p.add_argument("--workspace", type=Path, help="an indexed archive whose vectors (and S's masks) are replicated with noise")
    p.add_argument("--real-noise", type=float, default=0.3, help="norm of the noise moving each replicated real vector")
    p.add_argument("--chunk", type=int, default=100_000, help="vectors generated, scanned and added at a time")
    p.add_argument("--scratch", type=Path, default=Path("bench-ivfpq-scratch"), help="folder for the vector and index files")
    p.add_argument("--keep", action="store_true", help="keep the vector and index files")
    p.add_argument("--seed", type=int, default=0)
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    return finish("bench/bench_ivfpq.py", argv, args, run(args))


if __name__ == "__main__":
    main()
