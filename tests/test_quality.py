"""Match quality and "no close match": the calibration model, its file, its fitting command, and
the search's quality and notice through `Retriever`, `search` (table and --json) and the web API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from test_search import own_sketch
from test_server import LOCAL
from typer.testing import CliRunner

from cli import app
from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.phantom import write_phantom_dataset
from indexing.ingest import index_folders
from retrieval.calibrate import choose_threshold, fit, fit_logistic, scribble
from retrieval.evaluate import EvaluationOptions
from retrieval.models import SystemModels
from retrieval.quality import (
    CALIBRATION_FILE,
    FEATURES,
    HIT_FEATURES,
    NO_CLOSE_MATCH,
    Calibration,
    DomainGate,
    hit_features,
    load_calibration,
)
from retrieval.search import JSON_SCHEMA_VERSION, Retriever
from retrieval.server import create_app
from retrieval.vector import ArchiveEmbedder, VectorRecipe, fuse_vectors

runner = CliRunner()


def field_calibration(bundle_id: str, threshold: float) -> Calibration:
    """A hand-made calibration: quality rises steeply with the field cosine alone (0.5 at 0.9). It
    leaves out C's embedding, which the default vector weights leave out too."""
    return Calibration(bundle_id, np.array([0.9, 0, 0]), np.array([0.02, 1, 1]), np.array([1.0, 0, 0]), 0.0, threshold, 50.0,
                       features=("field", "code", "dice"))


def test_logistic_fit_is_calibrated_and_ignores_an_uninformative_feature():
    rng = np.random.default_rng(0)
    informative, noise = rng.uniform(0, 1, 4000), rng.normal(0, 1, 4000)
    close = rng.uniform(0, 1, 4000) < 1 / (1 + np.exp(-10 * (informative - 0.6)))
    mean, scale, weights, bias = fit_logistic(np.stack([informative, noise], axis=1), close)
    pad = len(HIT_FEATURES) - 2
    calibration = Calibration("x", np.r_[mean, [0] * pad], np.r_[scale, [1] * pad], np.r_[weights, [0] * pad], bias, 0.5, 50.0)
    quality = calibration.quality(np.concatenate([np.stack([informative, noise], axis=1), np.zeros((4000, pad + 1))], axis=1))
    assert weights[0] > 1 and abs(weights[1]) < 0.1 * weights[0]
    assert quality.mean() == pytest.approx(close.mean(), abs=0.01)  # a logistic fit's mean matches its labels'
    for low in (0.0, 0.4, 0.6, 0.8):  # and so do its bins of the informative feature
        chosen = (informative >= low) & (informative < low + 0.2)
        assert quality[chosen].mean() == pytest.approx(close[chosen].mean(), abs=0.06)


def test_quality_is_the_domain_probability_times_the_hit_model():
    calibration = field_calibration("x", 0.5)
    calibration.domain = DomainGate(2.0, 1.0, "0" * 64)
    features = np.array([[0.9, 0.1, np.nan, 0.3, 3.0], [0.9, 0.1, np.nan, 0.3, -8.0], [0.94, 0.1, np.nan, 0.3, -8.0]])
    quality = calibration.quality(features)
    in_domain = 1 / (1 + np.exp(-np.array([7.0, -15.0, -15.0])))
    assert np.allclose(quality, in_domain * 1 / (1 + np.exp(-np.array([0.0, 0.0, 2.0]))))
    assert quality[2] < 1e-6  # however close the hit, a sketch of another anatomy has no close match
    assert calibration.quality(np.c_[features[:, :4], [np.nan] * 3]) is None  # gated, no logit: no quality


def test_threshold_leaves_at_most_the_rate_of_in_domain_queries_below_it():
    best = np.random.default_rng(1).permutation(np.arange(100) / 100)
    assert choose_threshold(best, 0.05) == 0.05 and (best < 0.05).sum() == 5
    assert choose_threshold(best, 0.0) == 0.0 and (best < 0.0).sum() == 0
    assert choose_threshold(best, 0.999) == 0.99


def test_hit_features_are_the_cosines_of_the_vector_parts_and_dice():
    f, w, e = torch.randn(5, 6), torch.randn(5, 3), torch.randn(5, 4)
    vectors = fuse_vectors(f, w, e, VectorRecipe(sketch=0.6, code=0.3, image=0.1))
    features = hit_features(vectors[0], vectors[1:], np.array([10.0, 20, 30, 40]), (6, 3, 4))
    cos = torch.nn.functional.cosine_similarity
    expected = torch.stack([cos(f[0:1], f[1:]), cos(w[0:1], w[1:]), cos(e[0:1], e[1:])], dim=1).numpy()
    assert np.allclose(features[:, :3], expected, atol=1e-5) and np.allclose(features[:, 3], [0.1, 0.2, 0.3, 0.4])
    calibration = field_calibration("x", 0.5)
    assert calibration.quality(features).shape == (4,)
    # E's code weighted 0 or no DICE (--no-rerank): a feature is missing, and so is the quality
    no_code = fuse_vectors(f, w, e, VectorRecipe(sketch=0.9, code=0, image=0.1))
    assert np.isnan(hit_features(no_code[0], no_code[1:], np.ones(4), (6, 3, 4))[:, 1]).all()
    assert calibration.quality(hit_features(no_code[0], no_code[1:], np.ones(4), (6, 3, 4))) is None
    assert calibration.quality(hit_features(vectors[0], vectors[1:], None, (6, 3, 4))) is None


def test_scribbles_are_random_strokes_of_the_drawn_sketches_line_width():
    first, again, other = scribble(np.random.default_rng(3)), scribble(np.random.default_rng(3)), scribble(np.random.default_rng(4))
    assert first.shape == (256, 256) and first.dtype == np.uint8 and (first == 0).any()
    assert (first == again).all() and (first != other).any()
    assert 0.005 < (first == 0).mean() < 0.2  # lines, not filled areas


def test_calibration_file_round_trip_and_refusals(tmp_path):
    assert load_calibration(tmp_path, "abc") is None  # no file: search without quality
    calibration = field_calibration("abc", 0.42)
    path = calibration.save(tmp_path)
    assert path == tmp_path / CALIBRATION_FILE
    loaded = load_calibration(tmp_path, "abc")
    assert loaded.threshold == 0.42 and np.array_equal(loaded.weights, calibration.weights)
    assert loaded.features == ("field", "code", "dice")
    features = np.array([[0.92, 0.1, np.nan, 0.3, np.nan]])  # a workspace without C's part: the model does not use it
    assert loaded.quality(features)[0] == pytest.approx(1 / (1 + np.exp(-1)))
    assert loaded.quality(np.array([[0.92, 0.1, 0.5, np.nan, np.nan]])) is None  # no DICE (--no-rerank): no quality
    everything = Calibration("abc", np.zeros(len(HIT_FEATURES)), np.ones(len(HIT_FEATURES)), np.ones(len(HIT_FEATURES)), 0.0, 0.5, 50.0)
    assert everything.quality(features) is None  # it uses C's part, which these vectors lack
    with pytest.raises(InputError, match=r"fitted for the bundle abc, not for these weights \(def\); fit it again with "
                                         r"`python -m retrieval.calibrate fit --bundle"):
        load_calibration(tmp_path, "def")
    path.write_text('{"format": "sketch2medi-calibration", "format_version": 2, "features": ' + json.dumps(list(HIT_FEATURES)) + "}")
    with pytest.raises(InputError, match="damaged calibration"):
        load_calibration(tmp_path, "abc")
    path.write_text('{"format": "sketch2medi-calibration", "format_version": 1, "features": ' + json.dumps(list(FEATURES)) + "}")
    with pytest.raises(InputError, match="fitted by an earlier version, with the domain logit as a hit feature; fit it again with"):
        load_calibration(tmp_path, "abc")
    path.write_text("{not json")
    with pytest.raises(InputError, match="damaged calibration"):
        load_calibration(tmp_path, "abc")


@pytest.fixture(scope="module")
def indexed(tiny_chain, tmp_path_factory):
    """(workspace, bundle copy, models): the tiny data set indexed with a copy of the tiny bundle, in
    which the tests write calibration files."""
    data, bundle, _ = tiny_chain
    root = tmp_path_factory.mktemp("quality")
    copy = root / "bundle"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("cache", "samples"))
    models = SystemModels(copy, "cpu")
    index_folders(data / "images", root / "ws", ArchiveEmbedder(models), batch_size=8)
    return root / "ws", copy, models


def queries(tiny_chain, models, tmp_path):
    """An archive image's own synthesized sketch (a close match is in the archive) and a scribble (none is)."""
    own, scribbled = tmp_path / "own.png", tmp_path / "scribble.png"
    Image.fromarray(own_sketch(models, ImageDataset(tiny_chain[0]).image(2))).resize((256, 256), Image.NEAREST).save(own)
    Image.fromarray(scribble(np.random.default_rng(5))).save(scribbled)
    return own, scribbled


def test_quality_and_no_close_match_in_the_api_the_cli_and_the_web_api(tiny_chain, indexed, tmp_path):
    workspace, bundle, models = indexed
    own, scribbled = queries(tiny_chain, models, tmp_path)
    with Retriever(workspace, models=SystemModels(bundle, "cpu")) as retriever:  # no calibration: no quality, no notice
        plain = retriever.search(own, k=3)
    assert plain.no_close_match is None and all(hit.quality is None for hit in plain.results)
    assert plain.to_json()["no_close_match"] is None and plain.to_json()["schema_version"] == JSON_SCHEMA_VERSION == 3

    field_calibration(models.bundle_id, 0.5).save(bundle)
    with Retriever(workspace, models=SystemModels(bundle, "cpu")) as retriever:
        found, lost = retriever.search(own, k=3), retriever.search(scribbled, k=3)
        unranked = retriever.search(own, k=3, rerank=False)
    assert found.results[0].quality == pytest.approx(1 / (1 + np.exp(-5)), abs=1e-3)  # its own field: cosine 1
    assert found.no_close_match is False
    assert all(0 <= hit.quality <= 1 for hit in found.results + lost.results)
    assert lost.results[0].quality < 0.5 and lost.no_close_match is True and lost.quality_threshold == 0.5
    assert unranked.no_close_match is None and unranked.results[0].quality is None  # DICE is a feature

    args = ["--workspace", str(workspace), "--bundle", str(bundle), "--device", "cpu", "-k", "3"]
    answer = json.loads(runner.invoke(app, ["search", str(scribbled), *args, "--json"]).output)
    assert answer["no_close_match"] is True and answer["quality_threshold"] == 0.5
    assert answer["results"][0]["quality"] == round(lost.results[0].quality, 4) and answer["results"][0]["id"] == lost.results[0].id
    table = runner.invoke(app, ["search", str(scribbled), *args])
    assert table.exit_code == 0 and table.output.startswith(f"{NO_CLOSE_MATCH}: the best result's match quality ")
    assert any("rank" in line and "quality" in line for line in table.output.splitlines())  # the table's header
    table = runner.invoke(app, ["search", str(own), *args])
    assert table.exit_code == 0 and NO_CLOSE_MATCH not in table.output

    with Retriever(workspace, models=SystemModels(bundle, "cpu")) as retriever:
        client = TestClient(create_app(retriever), base_url=LOCAL)
        for path, expected in ((own, False), (scribbled, True)):
            body = client.post("/api/search", files={"sketch": ("s.png", path.read_bytes(), "image/png")}, data={"k": "3"}).json()
            assert body["no_close_match"] is expected and body["schema_version"] == 3 and body["results"][0]["quality"] is not None


def test_a_calibration_of_other_weights_is_refused_before_searching(tiny_chain, indexed, tmp_path):
    workspace, bundle, models = indexed
    field_calibration("0123456789abcdef", 0.5).save(bundle)
    try:
        result = runner.invoke(app, ["search", str(queries(tiny_chain, models, tmp_path)[0]), "--workspace", str(workspace),
                                     "--bundle", str(bundle), "--device", "cpu"])  # fmt: skip
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "fitted for the bundle 0123456789abcdef, not for these weights" in result.output
    finally:
        (bundle / CALIBRATION_FILE).unlink()


def test_fit_writes_a_calibration_that_flags_at_most_the_rate_of_its_in_domain_queries(tiny_chain, indexed, tmp_path):
    data, _, _ = tiny_chain
    _, bundle, models = indexed
    phantom = tmp_path / "other"
    write_phantom_dataset(phantom, 6, 64, 11)
    options = EvaluationOptions(strengths=(0.0, 1.0, 2.0), seeds=(0,), batch=8)
    calibration, rates = fit(data, "test", bundle, phantom, 1, 0.1, options, "cpu", "python -m retrieval.calibrate fit ...", scribbles=20)
    assert calibration.bundle_id == models.bundle_id and calibration.fitted_on["split"] == "test"
    in_domain = [row for row in rates if row["domain"] == "in"]
    flagged = sum(row["no_close_match"] * row["queries"] for row in in_domain)
    assert flagged <= 0.1 * sum(row["queries"] for row in in_domain) + 1e-9
    assert {row["set"] for row in rates} == {"test strength 0", "test strength 1", "test strength 2", "phantom", "scribbles"}
    assert [row["queries"] for row in rates if row["set"] == "scribbles"] == [20]
    calibration.save(bundle)
    try:
        assert load_calibration(bundle, models.bundle_id).threshold == calibration.threshold
    finally:
        (bundle / CALIBRATION_FILE).unlink()
