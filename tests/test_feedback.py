"""Query by example (`--image`, `--like`), relevance feedback (`--like`/`--unlike` with a sketch) and
`--where` through `Retriever`, the CLI and the web API, with the tiny bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_search import own_sketch
from test_server import LOCAL
from typer.testing import CliRunner

from cli import app
from generation.dataset import ImageDataset
from generation.errors import InputError
from indexing.ingest import index_folders
from retrieval.align import Alignment, mask_outlines
from retrieval.feedback import FeedbackOptions, PreparedQueries, simulate
from retrieval.models import SystemModels
from retrieval.relevance import Rocchio
from retrieval.search import Retriever
from retrieval.server import create_app
from retrieval.vector import ArchiveEmbedder

runner = CliRunner()


@pytest.fixture(scope="module")
def indexed(tiny_chain, tmp_path_factory):
    """(workspace, models, dataset): the tiny data set's 24 images indexed, tagged by their folder."""
    data, bundle, _ = tiny_chain
    models = SystemModels(bundle, "cpu")
    workspace = tmp_path_factory.mktemp("feedback") / "ws"
    index_folders(data / "images", workspace, ArchiveEmbedder(models), batch_size=8)
    return workspace, models, ImageDataset(data)


@pytest.fixture(scope="module")
def retriever(indexed):
    workspace, models, _ = indexed
    with Retriever(workspace, models=models) as opened:
        yield opened


def id_of(retriever, path) -> int:
    records = retriever.workspace.records_for(retriever.workspace.index.ids())
    return next(r.id for r in records.values() if r.path == str(path))


def test_rocchio_moves_the_query_toward_liked_and_away_from_disliked_vectors():
    query, liked, disliked = np.array([1.0, 0, 0]), np.array([[0, 1.0, 0]]), np.array([[0, 0, 1.0]])
    moved = Rocchio(query=1, liked=0.5, disliked=0.25).move(query, liked, disliked)
    assert np.allclose(moved, np.array([1, 0.5, -0.25]) / np.linalg.norm([1, 0.5, -0.25]))
    assert np.allclose(Rocchio().move(None, liked, np.zeros((0, 3))), liked[0])  # more like one image: its own vector
    with pytest.raises(InputError, match="cancel out"):
        Rocchio(query=0, liked=1, disliked=1).move(query, liked, liked)


def test_like_alone_ranks_that_image_first(retriever, indexed):
    for image_id in retriever.workspace.index.ids()[:5].tolist():
        result = retriever.search(like=[image_id], k=3)
        assert result.results[0].id == image_id and result.results[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert result.results[0].dice == pytest.approx(100.0) and result.sketch is None and result.like == (image_id,)


def test_an_archive_image_as_the_query_finds_itself_first(retriever, indexed):
    _, _, dataset = indexed
    path = dataset.samples[4].image_path
    result = retriever.search(image=path, k=3)
    assert result.results[0].id == id_of(retriever, path) and result.results[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert result.sketch.shape == result.image.shape[:2] == (retriever.models.resolution,) * 2
    assert retriever.search(image=Image.open(path), k=1).results[0].id == result.results[0].id


def test_feedback_moves_the_ranking_toward_the_liked_image(retriever, indexed):
    _, models, dataset = indexed
    sketch = own_sketch(models, dataset.image(2))
    before = retriever.search(sketch, k=24, candidates=24, rerank=False)
    liked, disliked = before.results[-1].id, before.results[1].id  # the worst hit is liked, the second disliked
    after = retriever.search(sketch, k=24, candidates=24, rerank=False, like=[liked], unlike=[disliked])
    rank = {hit.id: hit.rank for hit in after.results}
    assert rank[liked] < 24 and rank[disliked] > 2
    strong = retriever.search(sketch, k=3, rerank=False, like=[liked], feedback=Rocchio(query=1, liked=10, disliked=0))
    assert strong.results[0].id == liked


def test_where_limits_the_hits_and_reports_how_many_matched(retriever, indexed):
    _, models, dataset = indexed
    sketch = own_sketch(models, dataset.image(2))
    tag = retriever.workspace.records_for([1])[1].meta.tag
    result = retriever.search(sketch, k=30, where=f"tag={tag}")
    assert result.matching == 24 and len(result.results) == 24
    nothing = retriever.search(sketch, k=5, where="modality=CT")
    assert nothing.matching == 0 and nothing.results == [] and nothing.to_json()["where"] == "modality=CT"


@pytest.mark.parametrize("options, message", [
    ({"like": [999]}, "image id 999: not in this workspace; use an id from the search results"),
    ({"like": [1], "unlike": [1]}, "image 1 is both liked and disliked; keep it in one of the two"),
    ({}, "nothing to search by: give a sketch, an image, or the id of an archive image to find more like"),
    ({"sketch": np.zeros((8, 8), np.uint8), "image": np.zeros((8, 8, 3), np.uint8)}, "give a sketch or an image to search by, not both"),
])  # fmt: skip
def test_bad_queries_are_one_line_errors(retriever, options, message):
    with pytest.raises(InputError) as error:
        retriever.search(**options)
    assert str(error.value) == message


def test_search_command_by_like_image_where_and_its_errors(indexed, tmp_path):
    workspace, _, dataset = indexed
    common = ["--workspace", str(workspace), "--device", "cpu"]
    result = runner.invoke(app, ["search", "--like", "3", "-k", "2", "--json", *common])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["results"][0]["id"] == 3 and answer["like"] == [3] and answer["unlike"] == [] and answer["where"] is None
    result = runner.invoke(app, ["search", "--image", str(dataset.samples[0].image_path), "-k", "2", "--out", str(tmp_path / "out"), *common])
    assert result.exit_code == 0 and (tmp_path / "out" / "sketch.png").is_file()
    assert "rank" in result.output and " id " in result.output
    result = runner.invoke(app, ["search", "--like", "3", "--where", "modality=CT", *common])
    assert result.exit_code == 0 and "0 archive images match --where 'modality=CT'" in result.output
    for arguments, message in [(["--like", "999"], "image id 999: not in this workspace"),
                               (["--like", "3", "--where", "colour=red"], "--where clause 'colour=red': unknown field 'colour'"),
                               ([], "nothing to search by")]:  # fmt: skip
        result = runner.invoke(app, ["search", *arguments, *common])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_web_api_takes_like_unlike_image_and_where(retriever, indexed):
    _, _, dataset = indexed
    with TestClient(create_app(retriever), base_url=LOCAL) as client:
        answer = client.post("/api/search", data={"like": ["5", "6"], "unlike": "7", "k": "3"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["results"][0]["id"] in (5, 6) and body["like"] == [5, 6] and body["unlike"] == [7]
        assert body["schema_version"] == 3 and body["query"]["sketch"] is None
        with open(dataset.samples[1].image_path, "rb") as handle:
            by_image = client.post("/api/search", files={"image": ("x.png", handle.read(), "image/png")}, data={"k": "2"})
        assert by_image.status_code == 200 and by_image.json()["query"]["sketch"].startswith("data:image/png")
        filtered = client.post("/api/search", data={"like": "5", "where": "modality=CT"}).json()
        assert filtered["matching"] == 0 and filtered["results"] == []
        bad = client.post("/api/search", data={"like": "5", "where": "date>=yesterday"})
        assert bad.status_code == 400 and bad.json() == {"error": "--where clause 'date>=yesterday': 'yesterday' is not a date; write YYYY-MM-DD",
                                                         "field": "where"}
        unknown = client.post("/api/search", data={"like": "999"})
        assert unknown.status_code == 400 and "image id 999: not in this workspace" in unknown.json()["error"]


def test_the_simulated_user_s_feedback_brings_relevant_images_into_the_top_10():
    """8 irrelevant images near e2 outrank 22 relevant ones near e1 for a query a little closer to
    e2: liking the relevant hits and disliking the others moves the top 10 to the relevant ones."""
    rng = np.random.default_rng(0)
    irrelevant = np.array([0.0, 1.0, 0.0]) + 0.05 * rng.standard_normal((8, 3))
    relevant = np.array([1.0, 0.0, 0.0]) + 0.05 * rng.standard_normal((22, 3))
    archive = np.concatenate([irrelevant, relevant]).astype(np.float32)
    archive /= np.linalg.norm(archive, axis=1, keepdims=True)
    query = np.array([0.45, 0.55, 0.0], np.float32) / np.linalg.norm([0.45, 0.55, 0.0])
    target = 8 + int(np.argmin(archive[8:] @ query))  # the relevant image farthest from the query
    relevance = np.array([[0.0] * 8 + [80.0] * 22])
    relevance[0, target] = 100.0
    queries = PreparedQueries(np.array([target]), query[None], np.zeros((1, 30)), relevance)
    rounds = simulate(archive, queries, Rocchio(query=1, liked=0.75, disliked=1), FeedbackOptions(rounds=2, lam=1.0))
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["dice@10"] == pytest.approx(2 * 80 / 10) and rounds[0]["recall@10"] == 0
    assert rounds[0]["dice@10"] < rounds[1]["dice@10"] <= rounds[2]["dice@10"] and rounds[2]["dice@10"] >= 80


def test_the_simulated_searches_re_rank_with_the_sketch_aligned_to_the_candidates_contours():
    """As `search` does: a sketch that is exactly one candidate's contours, shifted by a few pixels,
    brings it from 11th by similarity into the top 10 through the alignment term; without the
    sketches (no alignment) it stays out."""
    rng = np.random.default_rng(1)
    labels = np.zeros((30, 32, 32), np.uint8)
    for n, (y, x) in enumerate(rng.integers(4, 14, (30, 2))):
        labels[n, y : y + 6 + n % 9, x : x + 10 + n % 7] = 1
    angles = 0.02 * np.arange(30)
    archive = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)  # similarity falls with the index
    query = np.array([1.0, 0.0], np.float32)
    target = 10
    assert np.argsort(-(archive @ query), kind="stable").tolist().index(target) == 10
    sketch = np.roll(mask_outlines([labels[target]], 32)[0], 2, axis=1)
    relevance = np.zeros((1, 30))
    plain = PreparedQueries(np.array([target]), query[None], np.zeros((1, 30)), relevance)
    aligned = PreparedQueries(np.array([target]), query[None], np.zeros((1, 30)), relevance, sketch[None], labels)
    options = FeedbackOptions(rounds=0, lam=1.0, alignment=Alignment(weight=0.5, tau=0.5, reduction=1))
    assert simulate(archive, plain, Rocchio(), options)[0]["recall@10"] == 0
    assert simulate(archive, aligned, Rocchio(), options)[0]["recall@10"] == 1
    assert set(aligned.aligned[0]) == set(range(30))  # every candidate aligned once, kept for the next rounds
