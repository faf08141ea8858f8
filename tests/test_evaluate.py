"""The evaluation protocol's pieces, and `train pix2pix|cyclegan|unit|ugatit` + `evaluate` end to end on the tiny bundle."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from cli import app
from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.sketch import INK, PAPER
from retrieval.evaluate import (
    DRAWN,
    METHODS,
    GroundTruth,
    chamfer_distances,
    drawn_queries,
    rank_of,
    recall_table,
    reference_orders,
    rerank_order,
)
from retrieval.metrics import dice_matrix, dice_per_image
from retrieval.oracle import AlignedChamfer

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
    table = recall_table(np.array([1, 2, 6, 11, 150, 300]), np.array([80.0, 60.0, 40.0, 20.0, 0.0, 0.0]))
    assert table["recall@1"] == 1 / 6 and table["recall@5"] == 2 / 6 and table["recall@10"] == 3 / 6
    assert table["recall@100"] == 4 / 6 and table["recall@200"] == 5 / 6
    assert table["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 11 + 1 / 150 + 1 / 300) / 6) and table["median_rank"] == 8.5
    assert table["dice@10"] == 100.0 / 3
    assert rank_of(7, np.array([3, 7, 1])) == 2


def corner_sketch(size: int = 64, angle: float = 0.0, shift: tuple[int, int] = (0, 0), arms: tuple[int, int] = (20, 12)) -> np.ndarray:
    """An L of two arms about the centre, rotated by `angle` degrees and shifted by (dx, dy) pixels."""
    t = np.linspace(0.0, 1.0, 200)[:, None]
    horizontal = np.hstack([-10 + arms[0] * t, np.full_like(t, 8.0)])
    vertical = np.hstack([np.full_like(t, -10.0), 8.0 - arms[1] * t])
    theta = np.radians(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = np.vstack([horizontal, vertical]) @ rotation.T + (size - 1) / 2 + np.array(shift)
    sketch = np.full((size, size), PAPER, np.uint8)
    xs, ys = np.rint(points).astype(int).T
    sketch[ys, xs] = INK
    return sketch


def test_oracle_finds_the_outline_under_rotation_scale_and_shift():
    blank = np.full((64, 64), PAPER, np.uint8)
    archive = np.stack([corner_sketch(arms=(12, 20)), corner_sketch(), corner_sketch(arms=(26, 6)), blank])
    oracle = AlignedChamfer(archive)
    assert oracle.distances(archive[1])[1] == pytest.approx(0, abs=1e-4)
    query = corner_sketch(angle=10, shift=(5, -4))  # the second outline, drawn tilted and off-centre
    transforms = np.stack([ndimage.distance_transform_edt(s != INK) for s in archive[:3]] + [np.full((64, 64), 1e3)])
    plain = chamfer_distances(query, archive, transforms)
    aligned = oracle.distances(query)
    assert np.argmin(aligned) == 1 and aligned[1] < 0.6 < plain[1]  # within a pixel once aligned (half resolution)
    assert np.isinf(aligned[3]) and np.all(np.isinf(oracle.distances(blank)))


def test_dice_matrix_is_dice_per_image_for_every_pair():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, (3, 12, 12)).astype(np.uint8)
    b = np.concatenate([a[1:2], np.zeros((1, 12, 12), np.uint8), rng.integers(0, 4, (2, 12, 12)).astype(np.uint8)])
    a[0] = 0
    expected = np.array([[dice_per_image(x, y, 4).mean for y in b] for x in a])
    assert np.allclose(dice_matrix(a, b, 4), expected, equal_nan=True)
    assert dice_matrix(a, b, 4)[1, 0] == 100 and np.isnan(dice_matrix(a, b, 4)[0, 1])


def write_dataset(root, masks: list[np.ndarray]) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k, mask in enumerate(masks):
        Image.fromarray(np.full((*mask.shape, 3), 40 * k % 255, np.uint8)).save(root / "images" / f"im{k:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{k:02d}.png")


def square_mask(left: int, size: int = 32, side: int = 12) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[10 : 10 + side, left : left + side] = 1
    return mask


def test_relevance_dice_at_10_and_the_reference_orders_on_a_known_archive(tmp_path):
    # Squares shifted 0, 1, ..., 13 px: DICE to the first is 100 * (12 - shift) / 12 for shifts below 12.
    masks = [square_mask(left) for left in range(2, 16)]
    write_dataset(tmp_path / "data", masks)
    dataset = ImageDataset(tmp_path / "data")
    truth = GroundTruth.of_dataset(dataset, 32, np.zeros((14, 32, 32), np.uint8), targets=[0], classes=2)
    assert truth.oracle is not None and truth.labels.shape == (14, 32, 32)
    expected = np.array([100 * max(12 - shift, 0) / 12 for shift in range(14)])
    assert np.allclose(truth.relevance[0], expected)
    orders = reference_orders(truth, np.full((32, 32), PAPER, np.uint8), target=0, number=0)
    assert list(orders["best"][:10]) == list(range(10))
    assert truth.relevance[0][orders["best"][:10]].mean() == pytest.approx(np.mean(expected[:10]))  # DICE@10 of the best
    assert sorted(orders["random"]) == list(range(14)) and list(orders["random"]) != list(range(14))
    assert np.array_equal(orders["random"], reference_orders(truth, np.full((32, 32), PAPER, np.uint8), 0, 0)["random"])


def test_drawn_sketches_folder_names_the_images_it_depicts(tmp_path):
    write_dataset(tmp_path / "data", [square_mask(left) for left in (2, 8, 14)])
    dataset = ImageDataset(tmp_path / "data")
    folder = tmp_path / "drawn"
    (folder / "sketches").mkdir(parents=True)
    for name in ("im02", "im00"):
        sketch = np.full((256, 256), 255, np.uint8)
        sketch[60:200, 100:104] = 0
        Image.fromarray(sketch).save(folder / "sketches" / f"{name}.png")
    queries = drawn_queries(dataset, folder, 32)
    assert queries.target == [0, 2] and queries.group == [DRAWN, DRAWN]
    assert all(q.shape == (32, 32) and (q == INK).any() for q in queries.sketches)
    assert drawn_queries(dataset, folder, 32, limit=1).target == [0]
    with pytest.raises(InputError, match="no sketches/ folder; pass a folder with sketches/NAME.png"):
        drawn_queries(dataset, tmp_path / "data", 32)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(folder / "sketches" / "im99.png")
    with pytest.raises(InputError, match="has no image im99; name each sketch after the image it depicts"):
        drawn_queries(dataset, folder, 32)


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
    for name in ("cyclegan", "unit", "ugatit"):  # the unpaired baselines, on the same sketch cache
        result = runner.invoke(app, ["train", name, "--data", str(data), "--bundle", str(target), "--preset", "tiny",
                                     "--steps", "2", "--batch", "2", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert f"trained {name} for 2 steps" in result.output and (target / f"{name}.safetensors").is_file()
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["evaluate", "--data", str(data), "--split", "train", "--bundle", str(target), "--limit", "3",
                                 "--seeds", "1", "--strengths", "0,1", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "| chamfer | 0 |" in result.output and "| pix2pix |" in result.output and "| oracle | 1 |" in result.output
    report = json.loads(out.read_text())
    assert set(report["retrieval"]) == set(METHODS)
    assert report["queries"] + report["empty_queries"] == 3 * 2
    for per_strength in report["retrieval"].values():
        for row in per_strength.values():
            assert 0 <= row["recall@1"] <= row["recall@5"] <= row["recall@10"] <= 1
            assert 1 <= row["median_rank"] <= report["archive_images"]
            assert 0 <= row["dice@10"] <= 100
    for strength, best in report["retrieval"]["best"].items():
        assert all(rows[strength]["dice@10"] <= best["dice@10"] + 1e-9 for rows in report["retrieval"].values())
    assert list(report["generation"]) == ["pix2pix", "cyclegan", "unit", "ugatit", "no_refiner", "sketch2medi"]
    assert "| cyclegan |" in result.output and "| ugatit | 1 |" in result.output and "KID_C" in result.output
    for rows in report["generation"].values():
        for row in rows.values():
            assert row["kid_c"] is None or (np.isfinite(row["kid_c"]) and row["kid_c_std"] >= 0)
    assert all(0 <= row["dice"] <= 100 for g in report["generation"].values() for row in g.values())
    bad = runner.invoke(app, ["evaluate", "--data", str(data), "--bundle", str(target), "--strengths", "half"])
    assert bad.exit_code == 2 and "--strengths" in bad.output

    drawn = tmp_path / "drawn"
    (drawn / "sketches").mkdir(parents=True)
    names = sorted(p.name for p in (data / "images").iterdir())[:2]
    for name in names:
        mask = np.asarray(Image.open(data / "masks" / name))  # its outlines as the drawing
        Image.fromarray(np.where(ndimage.binary_erosion(mask > 0) ^ (mask > 0), 0, 255).astype(np.uint8)).save(drawn / "sketches" / name)
    result = runner.invoke(app, ["evaluate", "--data", str(data), "--bundle", str(target), "--sketches", str(drawn),
                                 "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "2 queries on 2 images of drawn sketches" in result.output and "| full | drawn |" in result.output
    report = json.loads(out.read_text())
    assert report["queries"] == 2 and all(set(rows) == {DRAWN} for rows in report["retrieval"].values())


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


def test_labelled_rows_next_to_full(tiny_chain, tmp_path):
    """--methods keeps only the rows asked for; a full_labelled row per --label-weights pair; with
    weight 0 the class match has no say and the row is exactly full's."""
    data, bundle, _ = tiny_chain
    out = tmp_path / "labelled.json"
    result = runner.invoke(app, ["evaluate", "--data", str(data), "--split", "train", "--bundle", str(bundle), "--limit", "3",
                                 "--seeds", "1", "--strengths", "1", "--methods", "full", "--label-weights", "0:0,0.5:0.5",
                                 "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["retrieval"]) == ["full", "full_labelled[weight=0,dice=0]", "full_labelled[weight=0.5,dice=0.5]"]
    assert report["retrieval"]["full_labelled[weight=0,dice=0]"] == report["retrieval"]["full"]
    bad = runner.invoke(app, ["evaluate", "--data", str(data), "--bundle", str(bundle), "--methods", "full,everything"])
    assert bad.exit_code == 2 and "--methods: no method 'everything'" in bad.output
