"""The evaluation protocol's pieces, and `train pix2pix` + `evaluate` end to end on the tiny bundle."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from cli import app
from generation.sketch import INK, PAPER
from retrieval.evaluate import METHODS, chamfer_distances, rank_of, recall_table, rerank_order

runner = CliRunner()


def line_sketch(row: int, size: int = 32) -> np.ndarray:
    sketch = np.full((size, size), PAPER, np.uint8)
    sketch[row, 4:28] = INK
    return sketch


def test_chamfer_distance_is_zero_for_the_same_sketch_and_grows_with_the_shift():
    archive = np.stack([line_sketch(10), line_sketch(13), line_sketch(20), np.full((32, 32), PAPER, np.uint8)])
    transforms = np.stack([ndimage.distance_transform_edt(s != INK) for s in archive[:3]] + [np.full((32, 32), 1e3)])
    distances = chamfer_distances(line_sketch(10), archive, transforms)
    assert distances[0] == 0 and distances[1] == pytest.approx(3) and distances[2] == pytest.approx(10)
    assert np.isinf(distances[3])  # a blank archive sketch never matches


def test_recall_table_and_ranks():
    table = recall_table(np.array([1, 2, 6, 11]))
    assert table["recall@1"] == 0.25 and table["recall@5"] == 0.5 and table["recall@10"] == 0.75
    assert table["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 11) / 4) and table["median_rank"] == 4
    assert rank_of(7, np.array([3, 7, 1])) == 2


def test_rerank_moves_the_best_overlap_first_among_candidates_only():
    labels = np.zeros((8, 8), np.uint8)
    labels[2:6, 2:6] = 1
    archive = np.zeros((3, 8, 8), np.uint8)
    archive[2] = labels  # perfect overlap, but the lowest similarity
    archive[1, 0:2, 0:2] = 1
    similarity = np.array([0.9, 0.8, 0.1])
    assert list(rerank_order(similarity, labels, archive, candidates=3, lam=0.0, classes=2)) == [2, 0, 1]
    assert list(rerank_order(similarity, labels, archive, candidates=2, lam=0.0, classes=2)) == [0, 1, 2]
    assert list(rerank_order(similarity, labels, archive, candidates=3, lam=1.0, classes=2)) == [0, 1, 2]


def test_train_pix2pix_then_evaluate_every_method(tiny_chain, tmp_path):
    data, bundle, _ = tiny_chain
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("samples"))
    result = runner.invoke(app, ["train", "pix2pix", "--data", str(data), "--bundle", str(target), "--preset", "tiny",
                                 "--steps", "4", "--batch", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (target / "pix2pix.safetensors").is_file()
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", "--data", str(data), "--split", "train", "--bundle", str(target), "--limit", "3",
                                 "--seeds", "1", "--strengths", "0,1", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| chamfer | 0 |" in result.output and "| pix2pix |" in result.output
    report = json.loads(out.read_text())
    assert set(report["retrieval"]) == set(METHODS)
    assert report["queries"] + report["empty_queries"] == 3 * 2
    for per_strength in report["retrieval"].values():
        for row in per_strength.values():
            assert 0 <= row["recall@1"] <= row["recall@5"] <= row["recall@10"] <= 1
            assert 1 <= row["median_rank"] <= report["archive_images"]
    assert set(report["generation"]) == {"sketch2medi", "no_refiner", "pix2pix"}
    assert all(0 <= row["dice"] <= 100 for g in report["generation"].values() for row in g.values())
    bad = runner.invoke(app, ["evaluate", "--data", str(data), "--bundle", str(target), "--strengths", "half"])
    assert bad.exit_code == 2 and "--strengths" in bad.output


def test_refinement_report_and_figure(tiny_chain, tmp_path):
    from training.evaluate_sketch2medi import evaluate_refinement, refinement_figure

    data, bundle, _ = tiny_chain
    report, examples = evaluate_refinement(bundle, data, "train", limit=2, device="cpu")
    assert report["steps"] == 3 and report["images"] == 2
    assert {"synthesized", "freehand 0", "freehand 0.5", "freehand 1"} <= set(report["dice"])
    for row in report["dice"].values():
        assert all(0 <= row[f"step {t}"] <= 100 for t in range(4))
    refinement_figure(examples, tmp_path / "steps.png", images=2)
    picture = Image.open(tmp_path / "steps.png")
    assert picture.size == (2 * 32 * 6, 2 * 32 * 6)  # 2 images x 3 strengths; sketch, x_0..x_3, reference
