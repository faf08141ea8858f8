"""A FAISS index over the catalog's vectors, with few verbs and numpy in and out.

Scores are inner products of L2-normalised vectors (cosine similarity; vectors are normalised on
the way in). Ids are the catalog's integer image ids. Kinds:

    flat   exact: IndexFlatIP inside an IndexIDMap2 (the default below AUTO_THRESHOLD vectors)
    hnsw   approximate graph, M = 32, `ef_search` neighbours explored per query (default 64);
           `auto` picks it from AUTO_THRESHOLD vectors on, where exact search gets slow
    ivf    approximate inverted lists: nlist ~ 4 sqrt(n) k-means cells, `nprobe` visited per query
           (default max(8, sqrt(nlist))); the cells are fixed when it is built
    ivfpq  for archives of millions: an OPQ rotation, ~sqrt(n) k-means cells and product-quantized
           codes of dim/8 bytes (80 at 640-d; 88 bytes a vector with its id) instead of the vectors;
           a loaded index maps its inverted lists from the file (faiss.IO_FLAG_MMAP), so searching
           takes little RAM. The top `refine` x k codes are re-scored with the exact vectors when
           the index is given a way to fetch them (`exact_vectors`, the catalog's); `auto` picks it
           from IVFPQ_THRESHOLD vectors on, where an HNSW graph (dim*4 + 2*M*4 bytes a vector in RAM)
           no longer fits a workstation

The index is a cache: `indexing.ingest` rebuilds or patches it from the catalog whenever the two
differ, so it carries nothing the catalog lacks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from generation.errors import InputError

ExactVectors = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# The first bytes of a file holding an ivfpq index (faiss's tag of IndexPreTransform).
MAPPED_HEADER = b"IxPT"
KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq")
# Below this many vectors exact search of one query takes a few milliseconds on one core; above, `auto`
# builds an HNSW graph instead (recall ~0.99 at ef_search 64 for this kind of embedding).
AUTO_THRESHOLD = 100_000
HNSW_M = 32
# From this many vectors on, `auto` builds ivfpq: HNSW at 640-d holds ~2.8 kB a vector in RAM (5.6 GB
# at 2M, 28 GB at 10M) and takes ~9 minutes per million to build on two cores; ivfpq keeps 88 bytes.
IVFPQ_THRESHOLD = 2_000_000
# 8-bit codes need at least 256 training vectors; below this an ivfpq request keeps an exact index.
IVFPQ_MIN_COUNT = 256
# PQ candidates per requested hit that are re-scored with the exact vectors (when available).
IVFPQ_REFINE = 4
# Training samples: k-means needs no more than this many points per cell / for the codebooks.
TRAIN_PER_CELL = 64
TRAIN_PQ = 65_536
# A filter allowing at most this many ids is searched exactly on every kind (about a millisecond per query).
EXACT_SUBSET = 4096


def auto_kind(count: int, ivfpq_threshold: int | None = None) -> str:
    """flat below AUTO_THRESHOLD vectors, hnsw below `ivfpq_threshold` (default IVFPQ_THRESHOLD), then ivfpq."""
    ivfpq_threshold = IVFPQ_THRESHOLD if ivfpq_threshold is None else ivfpq_threshold
    if count >= max(ivfpq_threshold, IVFPQ_MIN_COUNT):
        return "ivfpq"
    return "flat" if count < AUTO_THRESHOLD else "hnsw"


def target_kind(requested: str, current: str | None, count: int, ivfpq_threshold: int | None = None) -> str:
    """The index kind to have: an explicit request, else the current one, upgraded as it grows
    (flat to hnsw from AUTO_THRESHOLD vectors, flat or hnsw to ivfpq from `ivfpq_threshold`)."""
    if count == 0:
        return "flat"  # ivf cannot be trained on nothing; it is built once there are vectors
    if requested == "ivfpq" and count < IVFPQ_MIN_COUNT:
        return "flat"  # too few vectors to learn the codes; built once there are enough
    if requested != "auto":
        return requested
    if current is None or current in ("flat", "hnsw") and auto_kind(count, ivfpq_threshold) == "ivfpq":
        return auto_kind(count, ivfpq_threshold)
    return "hnsw" if current == "flat" and count >= AUTO_THRESHOLD else current


def pq_bytes(dim: int) -> int:
    """Bytes of one ivfpq code: one 8-bit sub-quantizer per 8 dimensions (a divisor of dim)."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def ivfpq_cells(count: int) -> int:
    """ivfpq's k-means cells for `count` vectors: ~sqrt(n) (fewer than ivf's 4 sqrt(n): assigning
    millions of vectors to cells is the build's cost, and lists of ~sqrt(n) short codes scan fast)."""
    return max(1, min(count // 8, round(math.sqrt(count))))


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


def training_size(kind: str, count: int) -> int:
    """How many of `count` vectors `VectorIndex.trained` learns from (a random sample of that many)."""
    if kind == "ivf":
        return min(count, 256 * max(1, min(count, round(4 * math.sqrt(count)))))
    if kind == "ivfpq":
        return min(count, max(TRAIN_PQ, TRAIN_PER_CELL * ivfpq_cells(count)))
    return 0


def _trained_ivfpq(sample: np.ndarray, count: int, dim: int) -> faiss.Index:
    """OPQ rotation + IVF cells + PQ codebooks learnt from `sample` (shuffled), for `count` vectors."""
    nlist, m = ivfpq_cells(count), pq_bytes(dim)
    index = faiss.index_factory(dim, f"OPQ{m},IVF{nlist},PQ{m}", faiss.METRIC_INNER_PRODUCT)
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    opq.niter = 20  # the rotation converges in a few passes; each one trains a PQ, the costly part
    opq.max_train_points = min(len(sample), 32_768)
    rotation_pq = faiss.ProductQuantizer(dim, m, 8)  # the codebooks the rotation is fitted with
    ivf = _ivf_of(index)
    for clustering in (ivf.cp, ivf.pq.cp, rotation_pq.cp):
        clustering.min_points_per_centroid = 1  # small samples are fine here: no warnings about few points
    opq.pq = rotation_pq
    index.train(sample[: training_size("ivfpq", count)])
    opq.pq = None
    return index


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF index inside `index` (itself, or under a pre-transform), as its own class; else None."""
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else faiss.downcast_index(ivf)


class VectorIndex:
    def __init__(self, index: faiss.Index, use_gpu: bool = False, *, exact_vectors: ExactVectors | None = None,
                 refine: int = IVFPQ_REFINE):
        """`exact_vectors(ids)` -> (ids, vectors) like `Catalog.vectors`: where ivfpq reads the exact
        vectors to re-score its top `refine` x k candidates (None: scores are the codes' estimates)."""
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise InputError("the FAISS index does not use inner product; delete it to rebuild it from the catalog")
        self.index = index
        self.use_gpu = use_gpu
        self.exact_vectors = exact_vectors
        self.refine = refine
        self._gpu_index = None
        if isinstance(_ivf_of(index), faiss.IndexIVFPQ):
            self.kind = "ivfpq"
        elif isinstance(index, faiss.IndexIVF):
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
        exact_vectors: ExactVectors | None = None,
    ) -> VectorIndex:
        """An index over vectors (N, dim) with ids (N,). `exact_vectors`: see __init__ (ivfpq only)."""
        if kind not in KINDS:
            raise InputError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
        vectors = _normalised(vectors)
        ids = _ids(ids, len(vectors))
        kind = auto_kind(len(vectors)) if kind == "auto" else kind
        result = cls.trained(kind, vectors, len(vectors), vectors.shape[1], ef_search=ef_search, nprobe=nprobe, use_gpu=use_gpu,
                             exact_vectors=exact_vectors)  # fmt: skip
        if len(vectors):
            result.index.add_with_ids(vectors, ids)
        return result

    @classmethod
    def trained(
        cls,
        kind: str,
        sample: np.ndarray,
        count: int,
        dim: int,
        *,
        ef_search: int = 64,
        nprobe: int | None = None,
        use_gpu: bool = False,
        exact_vectors: ExactVectors | None = None,
    ) -> VectorIndex:
        """An empty index of `kind` (not auto) for `count` vectors of `dim`, its cells and codes learnt
        from `sample` (a random subset of them, any size; see `training_size`), ready for `add`:
        how an archive too large to hold in memory is indexed batch by batch."""
        if kind not in KINDS or kind == "auto":
            raise InputError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS[1:])}")
        sample = _normalised(sample, dim)
        rng = np.random.default_rng(0)
        if kind in ("ivf", "ivfpq") and count == 0:
            raise InputError(f"an {kind} index needs vectors to learn its cells; index some images first or use flat")
        if kind == "ivf":
            nlist = max(1, min(count, round(4 * math.sqrt(count))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.min_points_per_centroid = 1  # nlist is chosen for n on purpose: no warning about few points
            # k-means needs no more than ~256 points per cell; a random sample keeps training fast
            index.train(sample[rng.permutation(len(sample))[: 256 * nlist]])
            index.nprobe = nprobe or min(nlist, max(8, round(math.sqrt(nlist))))
        elif kind == "ivfpq":
            if len(sample) < IVFPQ_MIN_COUNT:
                raise InputError(f"an ivfpq index needs at least {IVFPQ_MIN_COUNT} vectors to learn its codes; use flat")
            index = _trained_ivfpq(sample[rng.permutation(len(sample))], count, dim)
            ivf = _ivf_of(index)
            ivf.nprobe = nprobe or min(ivf.nlist, max(16, round(math.sqrt(ivf.nlist) / 2)))
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = 80
            inner.hnsw.efSearch = ef_search
            index = faiss.IndexIDMap2(inner)
        else:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        return cls(index, use_gpu, exact_vectors=exact_vectors)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def ids(self) -> np.ndarray:
        """The stored ids, sorted, int64."""
        if self.kind in ("ivf", "ivfpq"):
            lists = self._ivf.invlists
            parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(lists.nlist) if lists.list_size(i)]
            return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))

    @property
    def _ivf(self) -> faiss.IndexIVF:
        return _ivf_of(self.index)

    def add(self, vectors: np.ndarray, ids: np.ndarray, *, known_new: bool = False) -> None:
        """Add vectors (N, dim) with ids (N,) not in the index yet (`known_new`: the caller has checked)."""
        vectors = _normalised(vectors, self.dim)
        ids = _ids(ids, len(vectors))
        if not len(ids):
            return
        if not known_new and np.isin(ids, self.ids()).any():
            raise ValueError("some ids are already in the index; remove them first")
        self._writable()
        self.index.add_with_ids(vectors, ids)
        self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (absent ones are ignored); returns how many were removed."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids) or not self.ntotal:
            return 0
        self._gpu_index = None
        if self.kind != "hnsw":
            if self.kind == "ivfpq" and not np.isin(ids, self.ids()).any():
                return 0  # nothing to do: the mapped lists stay mapped
            self._writable()
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

    def _writable(self) -> None:
        """Copy inverted lists mapped from the file (read-only) into memory before changing them."""
        if self.kind not in ("ivf", "ivfpq"):
            return
        ivf = self._ivf
        if isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
            return
        mapped, lists = ivf.invlists, faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        for i in range(ivf.nlist):
            if mapped.list_size(i):
                lists.add_entries(i, mapped.list_size(i), mapped.get_ids(i), mapped.get_codes(i))
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns and frees the new lists (and has freed the mapped ones)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 (Q, k), ids int64 (Q, k)), best first; missing hits are id -1, score -inf.

        `allowed`: search only these ids (a filter). It is applied inside the search (a FAISS
        IDSelector), so min(k, allowed ids stored) hits come back however few ids are allowed.
        """
        queries = _normalised(queries, self.dim)
        k = int(k)
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}")
        wide = k * self.refine if self.kind == "ivfpq" and self.exact_vectors is not None else k
        if allowed is not None:
            scores, ids = self._search_allowed(queries, wide, np.unique(np.asarray(allowed, np.int64)))
        else:
            scores, ids = self._searcher().search(queries, wide)
        if wide > k:
            scores, ids = self._rescored(queries, ids, k)
        scores[ids < 0] = -np.inf
        return scores, ids.astype(np.int64)

    def _rescored(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top k of each query's candidates by exact inner product with their stored vectors."""
        found, vectors = self.exact_vectors(np.unique(candidates[candidates >= 0]))
        vectors = _normalised(vectors, self.dim) if len(found) else np.zeros((0, self.dim), np.float32)
        order = np.argsort(found)
        found, vectors = np.asarray(found, np.int64)[order], vectors[order]
        scores = np.full(candidates.shape, -np.inf, np.float32)
        for q, row in enumerate(candidates):
            at = np.searchsorted(found, row).clip(max=max(0, len(found) - 1))
            known = (row >= 0) & (len(found) > 0) & (found[at] == row) if len(found) else np.zeros(len(row), bool)
            scores[q, known] = vectors[at[known]] @ queries[q]
        ids = np.where(np.isneginf(scores), -1, candidates)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        allowed = allowed[np.isin(allowed, self.ids())]
        if not len(allowed):
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        selector = faiss.IDSelectorBatch(len(allowed), faiss.swig_ptr(allowed))
        if self.kind == "flat":
            return self.index.search(queries, k, params=faiss.SearchParameters(sel=selector))
        if len(allowed) > EXACT_SUBSET:
            if self.kind in ("ivf", "ivfpq"):
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self._ivf.nprobe)
            else:
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=faiss.downcast_index(self.index.index).hnsw.efSearch)
            scores, ids = self.index.search(queries, k, params=params)
            if ((ids >= 0).sum(axis=1) >= min(k, len(allowed))).all():
                return scores, ids
        # A small allowed set is searched exhaustively: an approximate index would miss much of it (IVF:
        # outside the cells visited; HNSW: off the paths explored), and searching all of it is cheap.
        if self.kind in ("ivf", "ivfpq"):  # every cell (ivfpq: the codes' estimates, re-scored by search)
            return self.index.search(queries, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=self._ivf.nlist))
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

    def set_search_effort(self, ef_search: int | None = None, nprobe: int | None = None, refine: int | None = None) -> None:
        """HNSW's ef_search, IVF's nprobe, ivfpq's refine (candidates re-scored per hit): higher finds
        more of the true neighbours, slower."""
        if ef_search is not None and self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = int(ef_search)
        if nprobe is not None and self.kind in ("ivf", "ivfpq"):
            self._ivf.nprobe = min(int(nprobe), self._ivf.nlist)
        if refine is not None:
            self.refine = max(1, int(refine))

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
    def load(cls, path: str | Path, *, ef_search: int = 64, use_gpu: bool = False, exact_vectors: ExactVectors | None = None) -> VectorIndex:
        """Read an index file; an ivfpq index's lists stay in the file, mapped (read-only) into memory.
        `exact_vectors`: see __init__."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such index file")
        with open(path, "rb") as handle:
            mapped = handle.read(4) == MAPPED_HEADER  # ivfpq: an OPQ pre-transform around the IVF-PQ
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mapped else 0)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
            raise InputError(f"{path}: not a readable FAISS index ({reason}); delete it to rebuild it from the catalog")
        ivf = _ivf_of(index)
        if not isinstance(index, (faiss.IndexIDMap2, faiss.IndexIVF)) and not (mapped and isinstance(ivf, faiss.IndexIVFPQ)):
            raise InputError(f"{path}: not a sketch2medi index; delete it to rebuild it from the catalog")
        if mapped and path.stat().st_size < ivf.ntotal * (ivf.code_size + 8):  # mapped past its end: a crash
            raise InputError(f"{path}: a truncated index file; delete it to rebuild it from the catalog")
        result = cls(index, use_gpu, exact_vectors=exact_vectors)
        result.set_search_effort(ef_search=ef_search)
        return result
