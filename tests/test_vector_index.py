"""VectorIndex: exact top-1 for stored vectors in every kind, add/remove, save/load, GPU fallback."""

from __future__ import annotations

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
