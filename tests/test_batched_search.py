"""Searches computed together (`Retriever.search_many`, the server's micro-batches) give each
request its own result, the one it gets searched alone, and its own error, with the tiny bundle."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image
from test_search import own_sketch

from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.labelled import colour_coded
from indexing.ingest import index_folders
from retrieval.models import SystemModels
from retrieval.relevance import Rocchio
from retrieval.search import Retriever, SearchRequest, SearchResult
from retrieval.vector import ArchiveEmbedder

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from retrieval.server import SearchBatcher, _compiled, create_app  # noqa: E402

LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def indexed(tiny_chain, tmp_path_factory):
    """(retriever, dataset, ids): the tiny data set's 24 images indexed, tagged by their folder."""
    data, bundle, _ = tiny_chain
    models = SystemModels(bundle, "cpu")
    workspace = tmp_path_factory.mktemp("batched") / "ws"
    index_folders(data / "images", workspace, ArchiveEmbedder(models), batch_size=8)
    with Retriever(workspace, models=models) as retriever:
        yield retriever, ImageDataset(data), sorted(retriever.workspace.index.ids().tolist())


def drawn(indexed, i: int) -> np.ndarray:
    retriever, dataset, _ = indexed
    return own_sketch(retriever.models, dataset.image(i))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def labelled_png(sketch: np.ndarray, class_index: int) -> bytes:
    return png(colour_coded(sketch, np.where(sketch < 255, class_index, 0).astype(np.uint8)))


def assert_same(batched: SearchResult, alone: SearchResult) -> None:
    """The same hits in the same order with the same scores (to float32 rounding: a batch's
    convolutions sum in another order), and the same query shown."""
    assert [(h.rank, h.id, h.path, h.frame) for h in batched.results] == [(h.rank, h.id, h.path, h.frame) for h in alone.results]
    for a, b in zip(batched.results, alone.results):
        for name in ("score", "similarity", "dice", "aligned_chamfer", "class_match", "quality"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x == pytest.approx(y, abs=1e-4), (name, x, y)
    written, expected = batched.to_json(), alone.to_json()
    for name in ("where", "matching", "like", "unlike", "classes_drawn", "no_close_match", "quality_threshold"):
        assert written[name] == expected[name], name
    assert list(batched.timings_ms) == list(alone.timings_ms)  # the same stages
    for shown, expected_shown in ((batched.sketch, alone.sketch), (batched.image, alone.image)):
        assert (shown is None) == (expected_shown is None)
        if shown is not None:
            assert shown.shape == expected_shown.shape and np.abs(shown.astype(int) - expected_shown).max() <= 1
    assert batched.labels.shape == alone.labels.shape and (batched.labels != alone.labels).mean() < 0.01


def test_a_batch_of_different_searches_gives_each_its_own_result(indexed, tiny_chain):
    retriever, dataset, ids = indexed
    tag = retriever.workspace.records_for([ids[0]])[ids[0]].meta.tag
    a, b, c = drawn(indexed, 3), drawn(indexed, 7), drawn(indexed, 11)
    blank = np.full_like(a, 255)
    requests = [
        SearchRequest(a, k=3),
        SearchRequest(b, k=7, candidates=12, lam=0.5),
        SearchRequest(c, k=5, rerank=False),
        SearchRequest(a, k=4, steps=0),  # another number of refinement steps: its own group of the batch
        SearchRequest(b, k=5, like=[ids[2]], unlike=[ids[5]], feedback=Rocchio(query=1, liked=2, disliked=1)),
        SearchRequest(Image.open(io.BytesIO(labelled_png(c, 2))), k=3, labelled=True),
        SearchRequest(blank, k=3),  # a blank drawing: its own one-line error
        SearchRequest(image=dataset.image(5), k=3),  # query by example
        SearchRequest(like=[ids[4]], k=3),  # more like an archive image, no networks
        SearchRequest(a, k=3, like=[10**9]),  # an unknown id: its own error
        SearchRequest(c, k=6, where="modality=CT"),  # a filter nothing matches
        SearchRequest(Image.open(io.BytesIO(labelled_png(c, 7))), k=3, labelled=True),  # a class the bundle lacks
        SearchRequest(b, k=3, steps=-1),  # fails inside the batched networks: only it
        SearchRequest(c, k=3, alignment=None),
        SearchRequest(a, k=10, where=f"tag={tag}"),
    ]
    outcomes = retriever.search_many(requests)
    assert len(outcomes) == len(requests)
    errors = {6: "the sketch is empty", 9: "not in this workspace", 11: "class 7", 12: "steps -1"}
    for n, (request, outcome) in enumerate(zip(requests, outcomes)):
        if n in errors:
            assert isinstance(outcome, InputError) and errors[n] in str(outcome), (n, outcome)
            with pytest.raises(InputError, match=errors[n]):  # the error the search alone raises
                retriever.search(**vars(request))
            continue
        assert isinstance(outcome, SearchResult), (n, outcome)
        assert_same(outcome, retriever.search(**vars(request)))
    assert outcomes[10].matching == 0 and outcomes[10].results == []
    assert outcomes[5].classes_drawn == (2,) and len(outcomes[1].results) == 7 and outcomes[14].matching == 24


def test_one_request_alone_is_a_batch_of_one(indexed):
    retriever, _, _ = indexed
    sketch = drawn(indexed, 3)
    [batched] = retriever.search_many([SearchRequest(sketch, k=5)])
    alone = retriever.search(sketch, k=5)
    assert [(h.id, h.score, h.dice) for h in batched.results] == [(h.id, h.score, h.dice) for h in alone.results]  # the same code path
    assert retriever.search_many([]) == []


def test_compiled_networks_find_what_the_eager_ones_find(indexed, tiny_chain):
    retriever, _, _ = indexed
    with Retriever(retriever.workspace.path, models=SystemModels(tiny_chain[1], "cpu")) as compiled:
        _compiled(compiled)  # what `serve --compile` does before serving
        for n in (2, 5):
            eager, fast = retriever.search(drawn(indexed, n), k=5), compiled.search(drawn(indexed, n), k=5)
            assert [h.id for h in fast.results] == [h.id for h in eager.results]
            assert np.allclose([h.score for h in fast.results], [h.score for h in eager.results], atol=1e-4)


class Batches:
    """A retriever that records the size of each batch it is given."""

    def __init__(self, inner: Retriever):
        self.inner, self.workspace, self.models, self.sizes = inner, inner.workspace, inner.models, []

    def search_many(self, requests):
        self.sizes.append(len(requests))
        return self.inner.search_many(requests)


def post(client, data: bytes, **fields):
    return client.post("/api/search", files={"sketch": ("sketch.png", data, "image/png")},
                       data={k: [str(v) for v in v] if isinstance(v, list) else str(v) for k, v in fields.items()})


def test_concurrent_requests_are_searched_in_one_batch_each_getting_its_own_answer(indexed):
    """Requests that arrive together are one batch; each answer is the one the request gets alone
    (a server that searches one at a time), and a request's error is only its own."""
    retriever, _, ids = indexed
    a, b, c = (png(drawn(indexed, i)) for i in (3, 7, 11))
    requests = [  # (upload, form fields, expected status)
        (a, {"k": 3}, 200),
        (b, {"k": 6, "candidates": 10, "lambda": 0.5}, 200),
        (c, {"k": 4, "rerank": "false"}, 200),
        (a, {"k": 5, "where": "modality=CT"}, 200),
        (b, {"k": 3, "like": [ids[2]], "unlike": [ids[6]]}, 200),
        (labelled_png(drawn(indexed, 11), 2), {"k": 3, "labelled": "true"}, 200),
        (c, {"k": 3, "steps": 0, "group": "none"}, 200),
        (a, {"k": 3, "like": [10**9]}, 400),  # unknown id: fails in the batch, alone
        (png(np.full((64, 64), 255, np.uint8)), {"k": 3}, 400),  # a blank drawing: likewise
        (labelled_png(drawn(indexed, 3), 7), {"k": 3, "labelled": "true"}, 400),  # a class the bundle lacks
    ]
    batched = len(requests)
    watched = Batches(retriever)
    answers: list = [None] * (len(requests) + 1)
    with TestClient(create_app(watched, batch_wait_ms=30_000, max_batch=batched), base_url=LOCAL) as client:
        def send(n: int) -> None:
            upload, fields, _ = requests[n]
            answers[n] = post(client, upload, **fields)

        workers = [threading.Thread(target=send, args=(n,)) for n in range(len(requests))]
        for worker in workers:
            worker.start()
        answers[-1] = post(client, b"\x89PNG\r\n\x1a\n truncated", k=3)  # refused at decoding, never joins the batch
        for worker in workers:
            worker.join(120)
    assert watched.sizes == [batched]  # one batch, released as soon as it was full
    assert answers[-1].status_code == 400
    with TestClient(create_app(retriever, max_batch=1, batch_wait_ms=0), base_url=LOCAL) as alone:
        for (upload, fields, status), answer in zip(requests, answers):
            expected = post(alone, upload, **fields)
            assert answer.status_code == expected.status_code == status, (fields, answer.text)
            got, want = answer.json(), expected.json()
            if status != 200:
                assert got == want
                continue
            assert [(h["rank"], h["id"]) for h in got["results"]] == [(h["rank"], h["id"]) for h in want["results"]], fields
            assert [h["score"] for h in got["results"]] == pytest.approx([h["score"] for h in want["results"]], abs=1e-4)
            for name in ("params", "where", "matching", "like", "unlike", "classes_drawn", "groups"):
                assert got[name] == want[name], name


def test_the_batcher_waits_for_a_batch_and_keeps_each_outcome_apart():
    from concurrent.futures import ThreadPoolExecutor

    batches: list[list[int]] = []

    def run(items):
        batches.append(items)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    with ThreadPoolExecutor(1) as thread:
        batcher = SearchBatcher(run, thread, wait_s=0.5, max_batch=3)
        futures = [batcher.submit(i) for i in range(5)]
        assert [f.result(10) if i % 2 == 0 else str(f.exception(10)) for i, f in enumerate(futures)] == [0, "odd 1", 20, "odd 3", 40]
        assert batches == [[0, 1, 2], [3, 4]]
        assert batcher.submit(6).result(10) == 60 and batches[-1] == [6]  # alone after the wait
        unbatched = SearchBatcher(run, thread, wait_s=0, max_batch=1)
        assert [unbatched.submit(i).result(10) for i in (8, 10)] == [80, 100] and batches[-2:] == [[8], [10]]
    with pytest.raises(InputError, match="must not be negative"):
        SearchBatcher(run, None, wait_s=-1)
