"""A FAISS index over the catalog's vectors, with few verbs and numpy in and out.

Scores are inner products of L2-normalised vectors (cosine similarity; vectors are normalised on
the way in). Ids are the catalog's integer image ids. Kinds:

    flat   exact: IndexFlatIP inside an IndexIDMap2 (the default below AUTO_THRESHOLD vectors)
    hnsw   approximate graph, M = 32, `ef_search` neighbours explored per query (default 64);
           `auto` picks it from AUTO_THRESHOLD vectors on, where exact search gets slow
    ivf    approximate inverted lists: nlist ~ 4 sqrt(n) k-means cells, `nprobe` visited per query
           (default max(8, sqrt(nlist))); the cells are fixed when it is built

The index is a cache: `indexing.ingest` rebuilds or patches it from the catalog whenever the two
differ, so it carries nothing the catalog lacks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import faiss
import numpy as np

from generation.errors import InputError

KINDS = ("auto", "flat", "ivf", "hnsw")
# Below this many vectors exact search of one query takes a few milliseconds on one core; above, `auto`
# builds an HNSW graph instead (recall ~0.99 at ef_search 64 for this kind of embedding).
AUTO_THRESHOLD = 100_000
HNSW_M = 32
# A filter allowing at most this many ids is searched exactly on every kind (about a millisecond per query).
EXACT_SUBSET = 4096


def auto_kind(count: int) -> str:
    return "flat" if count < AUTO_THRESHOLD else "hnsw"


def target_kind(requested: str, current: str | None, count: int) -> str:
    """The index kind to have: an explicit request, else the current one, upgraded to HNSW when large."""
    if count == 0:
        return "flat"  # ivf cannot be trained on nothing; it is built once there are vectors
    if requested != "auto":
        return requested
    if current is None:
        return auto_kind(count)
    return "hnsw" if current == "flat" and count >= AUTO_THRESHOLD else current


def _normalised(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    vectors = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if vectors.ndim != 2 or (dim is not None and vectors.shape[1] != dim):
        raise ValueError(f"expected vectors of shape (N, {dim or 'dim'}), got {vectors.shape}")
    faiss.normalize_L2(vectors)
    return vectors


def _ids(ids: np.ndarray, count: int) -> np.ndarray:
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) != count:
        raise ValueError(f"{len(ids)} ids for {count} vectors")
    if len(np.unique(ids)) != len(ids) or (ids < 0).any():
        raise ValueError("ids must be distinct and non-negative")
    return ids


class VectorIndex:
    def __init__(self, index: faiss.Index, use_gpu: bool = False):
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise InputError("the FAISS index does not use inner product; delete it to rebuild it from the catalog")
        self.index = index
        self.use_gpu = use_gpu
        self._gpu_index = None
        if isinstance(index, faiss.IndexIVF):
            self.kind = "ivf"
        elif isinstance(faiss.downcast_index(index.index), faiss.IndexHNSW):
            self.kind = "hnsw"
        else:
            self.kind = "flat"

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        kind: str = "auto",
        *,
        ef_search: int = 64,
        nprobe: int | None = None,
        use_gpu: bool = False,
    ) -> VectorIndex:
        """An index over vectors (N, dim) with ids (N,)."""
        if kind not in KINDS:
            raise InputError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
        vectors = _normalised(vectors)
        ids = _ids(ids, len(vectors))
        count, dim = vectors.shape
        kind = auto_kind(count) if kind == "auto" else kind
        if kind == "ivf":
            if count == 0:
                raise InputError("an ivf index needs vectors to learn its cells; index some images first or use flat")
            nlist = max(1, min(count, round(4 * math.sqrt(count))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # nlist is chosen for n on purpose: no warning about few points
            # k-means needs no more than ~256 points per cell; a random sample keeps training fast
            sample = vectors[np.random.default_rng(0).permutation(count)[: 256 * nlist]]
            index.train(sample)
            index.nprobe = nprobe or min(nlist, max(8, round(math.sqrt(nlist))))
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = 80
            inner.hnsw.efSearch = ef_search
            index = faiss.IndexIDMap2(inner)
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        result = cls(index, use_gpu)
        if count:
            index.add_with_ids(vectors, ids)
        return result

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def ids(self) -> np.ndarray:
        """The stored ids, sorted, int64."""
        if self.kind == "ivf":
            lists = self.index.invlists
            parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(self.index.nlist) if lists.list_size(i)]
            return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vectors = _normalised(vectors, self.dim)
        ids = _ids(ids, len(vectors))
        if not len(ids):
            return
        if np.isin(ids, self.ids()).any():
            raise ValueError("some ids are already in the index; remove them first")
        self.index.add_with_ids(vectors, ids)
        self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (absent ones are ignored); returns how many were removed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids) or not self.ntotal:
            return 0
        self._gpu_index = None
        if self.kind != "hnsw":
            return int(self.index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))
        # an HNSW graph cannot delete nodes: rebuild it from the vectors it keeps
        inner = faiss.downcast_index(self.index.index)
        stored = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        keep = ~np.isin(stored, ids)
        if keep.all():
            return 0
        vectors = inner.reconstruct_n(0, self.ntotal)[keep]
        rebuilt = VectorIndex.build(vectors, stored[keep], "hnsw", ef_search=inner.hnsw.efSearch)
        self.index = rebuilt.index
        return int((~keep).sum())

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (Q, k), ids int64 (Q, k)), best first; missing hits are id -1, score -inf.

        `allowed`: search only these ids (a filter). It is applied inside the search (a FAISS
        IDSelector), so min(k, allowed ids stored) hits come back however few ids are allowed.
        """
        queries = _normalised(queries, self.dim)
        k = int(k)
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        if allowed is not None:
            scores, ids = self._search_allowed(queries, k, np.unique(np.asarray(allowed, np.int64)))
        else:
            scores, ids = self._searcher().search(queries, k)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64)

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        allowed = allowed[np.isin(allowed, self.ids())]
        if not len(allowed):
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        selector = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))
        if self.kind == "flat":
            return self.index.search(queries, k, params=faiss.SearchParameters(sel=selector))
        if len(allowed) > EXACT_SUBSET:
            if self.kind == "ivf":
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)
            else:
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=faiss.downcast_index(self.index.index).hnsw.efSearch)
            scores, ids = self.index.search(queries, k, params=params)
            if ((ids >= 0).sum(axis=1) >= min(k, len(allowed))).all():
                return scores, ids
        # A small allowed set is searched exactly: an approximate index would miss much of it (IVF:
        # outside the cells visited; HNSW: off the paths explored), and exact search of it is cheap.
        if self.kind == "ivf":
            return self.index.search(queries, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nlist))
        exact = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        exact.add_with_ids(np.stack([self.index.reconstruct(int(i)) for i in allowed]), allowed)
        return exact.search(queries, k)

    def _searcher(self) -> faiss.Index:
        # Exact search on a GPU when faiss has GPU support and a GPU exists; everything else on the CPU.
        if not self.use_gpu or self.kind != "flat" or not hasattr(faiss, "StandardGpuResources"):
            return self.index
        if faiss.get_num_gpus() < 1:
            return self.index
        if self._gpu_index is None:
            self._gpu_resources = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
        return self._gpu_index

    def set_search_effort(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """HNSW's ef_search or IVF's nprobe: higher finds more of the true neighbours, slower."""
        if ef_search is not None and self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = int(ef_search)
        if nprobe is not None and self.kind == "ivf":
            self.index.nprobe = min(int(nprobe), self.index.nlist)

    def save(self, path: str | Path) -> None:
        """Write atomically: a reader sees the previous file or this one, never half a file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        faiss.write_index(self.index, str(tmp))
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the bytes are on disk before the name points at them
        finally:
            os.close(descriptor)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, *, ef_search: int = 64, use_gpu: bool = False) -> VectorIndex:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such index file")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
            raise InputError(f"{path}: not a readable FAISS index ({reason}); delete it to rebuild it from the catalog")
        if not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIVF)):
            raise InputError(f"{path}: not a sketch2medi index; delete it to rebuild it from the catalog")
        result = cls(index, use_gpu)
        result.set_search_effort(ef_search=ef_search)
        return result
