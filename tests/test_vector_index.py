"""VectorIndex: exact top-1 for stored vectors in every kind, add/remove, save/load, GPU fallback."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import indexing.vector_index as vector_index
from generation.errors import InputError
from indexing.vector_index import VectorIndex


def unit_vectors(count: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


IDS = np.arange(1000, 1300, dtype=np.int64)  # catalog ids need not start at 0 nor be contiguous
VECTORS = unit_vectors(len(IDS))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_every_kind_finds_each_stored_vector_first(kind):
    index = VectorIndex.build(VECTORS, IDS, kind)
    assert index.kind == kind and index.ntotal == len(IDS) and index.dim == 16
    np.testing.assert_array_equal(index.ids(), IDS)
    scores, ids = index.search(VECTORS, 5)
    np.testing.assert_array_equal(ids[:, 0], IDS)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)  # cosine of a vector with itself
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_scores_are_cosine_similarities_of_unnormalised_inputs():
    raw = VECTORS[:20] * np.linspace(0.1, 30, 20, dtype=np.float32)[:, None]
    index = VectorIndex.build(raw, IDS[:20], "flat")
    query = VECTORS[3] * 7.0
    scores, ids = index.search(query[None], 20)
    order = np.argsort(-(VECTORS[:20] @ VECTORS[3]))
    np.testing.assert_array_equal(ids[0], IDS[:20][order])
    np.testing.assert_allclose(scores[0], (VECTORS[:20] @ VECTORS[3])[order], atol=1e-5)


def test_flat_matches_brute_force_top_k():
    index = VectorIndex.build(VECTORS, IDS)
    queries = unit_vectors(7, seed=1)
    _, ids = index.search(queries, 10)
    expected = IDS[np.argsort(-(queries @ VECTORS.T), axis=1)[:, :10]]
    np.testing.assert_array_equal(ids, expected)


def test_auto_is_exact_below_the_threshold_and_hnsw_above(monkeypatch):
    assert VectorIndex.build(VECTORS, IDS, "auto").kind == "flat"
    monkeypatch.setattr(vector_index, "AUTO_THRESHOLD", 100)
    assert VectorIndex.build(VECTORS, IDS, "auto").kind == "hnsw"


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_then_remove(kind):
    index = VectorIndex.build(VECTORS[:200], IDS[:200], kind)
    index.add(VECTORS[200:], IDS[200:])
    assert index.ntotal == 300
    _, ids = index.search(VECTORS[250:260], 1)
    np.testing.assert_array_equal(ids[:, 0], IDS[250:260])

    gone = IDS[::3]
    assert index.remove(np.append(gone, 5)) == len(gone)  # an absent id is ignored
    kept = np.setdiff1d(IDS, gone)
    np.testing.assert_array_equal(index.ids(), kept)
    _, ids = index.search(VECTORS, 1)
    assert not np.isin(ids, gone).any()
    keep = ~np.isin(IDS, gone)
    np.testing.assert_array_equal(ids[keep, 0], IDS[keep])
    assert index.remove(np.array([], np.int64)) == 0


def test_adding_an_existing_id_is_refused():
    index = VectorIndex.build(VECTORS[:10], IDS[:10])
    with pytest.raises(ValueError, match="already"):
        index.add(VECTORS[10:12], IDS[8:10])
    with pytest.raises(ValueError, match="distinct"):
        VectorIndex.build(VECTORS[:2], np.array([1, 1]))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    index = VectorIndex.build(VECTORS, IDS, kind, ef_search=80, nprobe=3)
    path = tmp_path / "index.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]  # no temporary file left behind
    loaded = VectorIndex.load(path, ef_search=80)
    assert loaded.kind == kind and loaded.ntotal == index.ntotal
    np.testing.assert_array_equal(loaded.ids(), IDS)
    queries = unit_vectors(5, seed=2)
    for a, b in zip(index.search(queries, 4), loaded.search(queries, 4)):
        np.testing.assert_array_equal(a, b)
    if kind == "ivf":
        assert loaded.index.nprobe == 3


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "index.faiss"
    VectorIndex.build(VECTORS[:5], IDS[:5]).save(path)
    VectorIndex.build(VECTORS[:7], IDS[:7]).save(path)
    assert VectorIndex.load(path).ntotal == 7


def test_k_beyond_the_index_pads_with_minus_one():
    index = VectorIndex.build(VECTORS[:3], IDS[:3])
    scores, ids = index.search(VECTORS[:1], 5)
    assert set(ids[0, :3]) == set(IDS[:3]) and (ids[0, 3:] == -1).all()
    assert np.isneginf(scores[0, 3:]).all()
    empty = VectorIndex.build(np.zeros((0, 16), np.float32), np.zeros(0, np.int64))
    assert empty.ntotal == 0 and len(empty.ids()) == 0
    assert (empty.search(VECTORS[:2], 3)[1] == -1).all()


def test_use_gpu_falls_back_to_the_cpu_without_a_gpu():
    cpu = VectorIndex.build(VECTORS, IDS, "flat")
    gpu = VectorIndex.build(VECTORS, IDS, "flat", use_gpu=True)
    queries = unit_vectors(4, seed=3)
    for a, b in zip(cpu.search(queries, 3), gpu.search(queries, 3)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    gpu.add(unit_vectors(1, seed=4), np.array([7]))
    assert gpu.search(unit_vectors(1, seed=4), 1)[1][0, 0] == 7


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="unknown index kind"):
        VectorIndex.build(VECTORS, IDS, "annoy")
    with pytest.raises(InputError, match="ivf"):
        VectorIndex.build(np.zeros((0, 16), np.float32), np.zeros(0, np.int64), "ivf")
    with pytest.raises(ValueError, match="shape"):
        VectorIndex.build(VECTORS[:3], IDS[:3]).search(np.zeros((1, 8), np.float32), 1)
    garbage = tmp_path / "index.faiss"
    garbage.write_bytes(b"not an index at all")
    with pytest.raises(InputError, match="delete it"):
        VectorIndex.load(garbage)
    with pytest.raises(InputError, match="no such"):
        VectorIndex.load(tmp_path / "missing.faiss")


def clustered(count: int, dim: int = 32, centres: int = 20, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few random centres, as embeddings of similar images gather."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim))
    vectors = middle[rng.integers(centres, size=count)] + 0.3 * rng.normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


PQ_IDS = np.arange(5000, 7000, 2, dtype=np.int64)  # 1,000 ids
PQ_VECTORS = clustered(len(PQ_IDS))


def exact_lookup(ids: np.ndarray, vectors: np.ndarray):
    """An `exact_vectors` callback like Catalog.vectors: (ids, vectors) of the known ones."""
    by_id = dict(zip(ids.tolist(), vectors))

    def lookup(wanted):
        found = np.array(sorted({int(i) for i in wanted} & by_id.keys()), np.int64)
        return found, np.stack([by_id[i] for i in found]) if len(found) else np.zeros((0, vectors.shape[1]), np.float32)

    return lookup


def pq_index(**kwargs) -> VectorIndex:
    return VectorIndex.build(PQ_VECTORS, PQ_IDS, "ivfpq", exact_vectors=exact_lookup(PQ_IDS, PQ_VECTORS), **kwargs)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / truth.shape[1] for f, t in zip(found, truth)]))


def test_ivfpq_stores_short_codes_and_finds_each_stored_vector_first():
    index = pq_index()
    ivf = vector_index._ivf_of(index.index)
    assert index.kind == "ivfpq" and index.ntotal == 1000 and index.dim == 32
    assert ivf.code_size == 4  # one byte per 8 dimensions
    np.testing.assert_array_equal(index.ids(), PQ_IDS)
    scores, ids = index.search(PQ_VECTORS[:100], 5)
    first = ids[:, 0] == PQ_IDS[:100]
    assert first.mean() >= 0.95  # approximate: a vector outside the cells visited can be missed
    np.testing.assert_allclose(scores[first, 0], 1.0, atol=1e-5)  # re-scored exactly
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_ivfpq_recall_against_exact_search():
    index, exact = pq_index(), VectorIndex.build(PQ_VECTORS, PQ_IDS, "flat")
    queries = clustered(100, seed=1)
    _, truth = exact.search(queries, 10)
    _, found = index.search(queries, 10)
    assert recall_at(found, truth) >= 0.9
    index.exact_vectors = None  # without the exact vectors: the codes' estimates alone
    _, estimated = index.search(queries, 10)
    assert recall_at(estimated, truth) >= 0.5


def test_ivfpq_add_remove_and_filter():
    index = VectorIndex.build(PQ_VECTORS[:600], PQ_IDS[:600], "ivfpq", exact_vectors=exact_lookup(PQ_IDS, PQ_VECTORS))
    index.add(PQ_VECTORS[600:], PQ_IDS[600:])
    assert index.ntotal == 1000
    with pytest.raises(ValueError, match="already"):
        index.add(PQ_VECTORS[:1], PQ_IDS[:1])
    gone = PQ_IDS[::3]
    assert index.remove(np.append(gone, 3)) == len(gone)
    np.testing.assert_array_equal(index.ids(), np.setdiff1d(PQ_IDS, gone))
    _, ids = index.search(PQ_VECTORS, 10)
    keep = ~np.isin(PQ_IDS, gone)
    assert not np.isin(ids, gone).any()
    assert (ids[keep] == PQ_IDS[keep, None]).any(axis=1).mean() >= 0.95  # each kept vector among its own top 10
    allowed = PQ_IDS[keep][::7]
    scores, ids = index.search(PQ_VECTORS[:5], 10, allowed=np.append(allowed, gone[:3]))
    assert np.isin(ids, allowed).all()  # only allowed ids, and 10 of them however far they lie
    expected = allowed[np.argsort(-(PQ_VECTORS[:5] @ PQ_VECTORS[np.searchsorted(PQ_IDS, allowed)].T), axis=1)[:, :10]]
    np.testing.assert_array_equal(ids, expected)  # few allowed: all of them searched, re-scored exactly


def test_ivfpq_save_and_reload_from_disk_gives_the_same_results(tmp_path):
    index = pq_index(nprobe=4)
    path = tmp_path / "index.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["index.faiss"]  # one file, replaced atomically
    overhead = (256 * 32 + 32 * 32 + 32 * 32) * 4 + 1024  # codebooks, rotation, 32 cells' centroids, headers
    assert path.stat().st_size < 1000 * (4 + 8) + overhead  # 4 bytes of code and 8 of id a vector
    loaded = VectorIndex.load(path, exact_vectors=exact_lookup(PQ_IDS, PQ_VECTORS))
    assert loaded.kind == "ivfpq" and vector_index._ivf_of(loaded.index).nprobe == 4
    assert not isinstance(faiss.downcast_InvertedLists(vector_index._ivf_of(loaded.index).invlists), faiss.ArrayInvertedLists)
    np.testing.assert_array_equal(loaded.ids(), PQ_IDS)
    queries = clustered(20, seed=2)
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(index.search(queries, 10, allowed=PQ_IDS[:40]), loaded.search(queries, 10, allowed=PQ_IDS[:40])):
        np.testing.assert_array_equal(a, b)
    loaded.remove(PQ_IDS[:10])  # the mapped lists are copied into memory before they change
    loaded.add(PQ_VECTORS[:10] * -1, PQ_IDS[:10] + 1)
    loaded.save(path)  # over the file it maps
    again = VectorIndex.load(path)
    np.testing.assert_array_equal(again.ids(), np.sort(np.r_[PQ_IDS[10:], PQ_IDS[:10] + 1]))


def test_ivfpq_needs_enough_vectors_to_learn_its_codes():
    with pytest.raises(InputError, match="at least 256 vectors"):
        VectorIndex.build(PQ_VECTORS[:100], PQ_IDS[:100], "ivfpq")
    assert vector_index.target_kind("ivfpq", None, 100) == "flat"
    assert vector_index.target_kind("ivfpq", "flat", 300) == "ivfpq"


def test_auto_picks_ivfpq_above_its_threshold(monkeypatch):
    assert vector_index.auto_kind(1_000) == "flat" and vector_index.auto_kind(500_000) == "hnsw"
    assert vector_index.auto_kind(vector_index.IVFPQ_THRESHOLD) == "ivfpq"
    assert vector_index.auto_kind(900, ivfpq_threshold=800) == "ivfpq"
    assert vector_index.target_kind("auto", "hnsw", 900, ivfpq_threshold=800) == "ivfpq"
    assert vector_index.target_kind("auto", "flat", 900, ivfpq_threshold=800) == "ivfpq"
    assert vector_index.target_kind("auto", "ivf", 900, ivfpq_threshold=800) == "ivf"  # a chosen kind is kept
    assert vector_index.target_kind("auto", "hnsw", 700, ivfpq_threshold=800) == "hnsw"
    monkeypatch.setattr(vector_index, "IVFPQ_THRESHOLD", 800)
    assert VectorIndex.build(PQ_VECTORS, PQ_IDS, "auto").kind == "ivfpq"
