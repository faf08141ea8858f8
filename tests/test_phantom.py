"""The procedural pharyngeal phantom: determinism, anatomy, exact masks, the dataset writer."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.phantom import (
    PART_CLASS,
    PHANTOM_CLASSES,
    image_seed,
    image_split,
    phantom_anatomy,
    phantom_mask,
    phantom_sample,
    rasterise,
    write_phantom_dataset,
)
from generation.sketch import mask_instances

UVULA, WALL, TONSIL, TONGUE = 1, 2, 3, 4


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another class."""
    edge = np.zeros(mask.shape, bool)
    rows, cols = mask[:-1] != mask[1:], mask[:, :-1] != mask[:, 1:]
    edge[:-1] |= rows
    edge[1:] |= rows
    edge[:, :-1] |= cols
    edge[:, 1:] |= cols
    return edge


def luminance(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) @ np.array([0.3, 0.59, 0.11], np.float32)


def test_same_seed_same_sample_and_different_seeds_differ():
    image, mask = phantom_sample(7, 64)
    again_image, again_mask = phantom_sample(7, 64)
    assert np.array_equal(image, again_image) and np.array_equal(mask, again_mask)
    other_image, other_mask = phantom_sample(8, 64)
    assert not np.array_equal(image, other_image)
    assert not np.array_equal(mask, other_mask)


@pytest.mark.parametrize("size", [32, 64, 512])
def test_shapes_dtypes_and_classes(size):
    image, mask = phantom_sample(3, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= set(PHANTOM_CLASSES)
    assert image.std() > 10  # a picture, not a flat fill


def test_every_class_present_and_tonsils_are_two_instances_usually():
    tonsil_counts = Counter()
    for seed in range(40):
        instances = Counter(cls for cls, _ in mask_instances(phantom_mask(phantom_anatomy(seed), 64)))
        assert instances[UVULA] == 1 and instances[TONGUE] == 1 and instances[WALL] >= 1
        assert instances[TONSIL] <= 2
        tonsil_counts[instances[TONSIL]] += 1
    assert tonsil_counts[2] >= 32  # left and right; sometimes one is small or absent


def test_tonsils_are_left_and_right_of_the_uvula():
    for seed in range(20):
        mask = phantom_mask(phantom_anatomy(seed), 64)
        tonsils = [m for cls, m in mask_instances(mask) if cls == TONSIL]
        if len(tonsils) == 2:
            uvula_x = np.nonzero(mask == UVULA)[1].mean()
            xs = sorted(np.nonzero(t)[1].mean() for t in tonsils)
            assert xs[0] < uvula_x < xs[1]


def test_geometry_does_not_depend_on_the_size():
    anatomy = phantom_anatomy(11)
    small, large = phantom_mask(anatomy, 64), phantom_mask(anatomy, 256)
    assert (large[2::4, 2::4] == small).mean() > 0.97


def test_mask_agrees_with_the_supersampled_drawing():
    # the image is drawn from the parts at 2x; each mask pixel's class covers its 2x2 block mostly
    for seed in range(5):
        anatomy = phantom_anatomy(seed)
        mask = phantom_mask(anatomy, 64)
        fine = PART_CLASS[rasterise(anatomy, 128).parts].reshape(64, 2, 64, 2)
        agree = (fine == mask[:, None, :, None]).sum(axis=(1, 3))
        assert (agree >= 2).mean() > 0.99


def test_mask_boundaries_are_image_edges():
    # a mask shifted by 3 px (or a wrong mask) has its boundaries off the drawn edges
    ratios = []
    for seed in range(12):
        image, mask = phantom_sample(seed, 96)
        slope_y, slope_x = np.gradient(luminance(image))
        gradient = np.hypot(slope_x, slope_y)
        on_edges = gradient[boundary(mask)].mean()
        shifted = max(gradient[boundary(np.roll(mask, s, axis=a))].mean() for s in (-3, 3) for a in (0, 1))
        ratios.append(on_edges / shifted)
    assert min(ratios) > 1.05 and np.mean(ratios) > 1.2


def test_class_colours_follow_the_anatomy():
    # the far pharyngeal wall is darker and redder than the near tongue and the uvula
    for seed in range(12):
        image, mask = phantom_sample(seed, 64)
        light = luminance(image)
        redness = image[..., 0] / (image.sum(axis=-1) + 1.0)
        assert light[mask == WALL].mean() < light[mask == TONGUE].mean()
        assert light[mask == WALL].mean() < light[mask == UVULA].mean()
        assert redness[mask == WALL].mean() > redness[mask == TONGUE].mean()


def test_splits_are_deterministic_and_about_80_10_10():
    seeds = [image_seed(0, i) for i in range(2000)]
    assert seeds == [image_seed(0, i) for i in range(2000)] and len(set(seeds)) == 2000
    counts = Counter(image_split(s) for s in seeds)
    assert 1500 < counts["train"] < 1700 and 130 < counts["val"] < 270 and 130 < counts["test"] < 270


@pytest.mark.parametrize("n", [5, 16])  # 16 uses worker processes
def test_write_phantom_dataset(tmp_path: Path, n: int):
    out = tmp_path / "phantom"
    ticks = []
    write_phantom_dataset(out, n=n, size=32, seed=3, on_image=lambda: ticks.append(1))
    assert len(ticks) == n
    dataset = ImageDataset(out)
    assert len(dataset) == n and dataset.has_masks
    assert dataset.classes == PHANTOM_CLASSES and dataset.num_classes == 5
    assert {s.split for s in dataset.samples} <= {"train", "val", "test"}
    with (out / "split.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file"] for r in rows] == [s.name for s in dataset.samples]
    for index in (0, n - 1):
        image, mask = phantom_sample(int(rows[index]["seed"]), 32)
        assert np.array_equal(dataset.image(index), image)
        assert np.array_equal(dataset.mask(index), mask)
    assert json.loads((out / "phantom.json").read_text())["n"] == n
    write_phantom_dataset(out, n=n, size=32, seed=3)  # the same dataset again: allowed
    with pytest.raises(InputError, match="other parameters"):
        write_phantom_dataset(out, n=n, size=64, seed=3)


def test_refuses_a_foreign_non_empty_folder_or_a_file(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a phantom dataset"):
        write_phantom_dataset(tmp_path, n=2, size=32, seed=0)
    with pytest.raises(InputError, match="not a folder"):
        write_phantom_dataset(tmp_path / "notes.txt", n=2, size=32, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "kwargs",
    [dict(size=31), dict(size=513), dict(size=64.0), dict(n=0), dict(n=-3), dict(seed=-1)],
)
def test_bad_arguments_are_input_errors(tmp_path: Path, kwargs):
    arguments = dict(n=2, size=32, seed=0) | kwargs
    with pytest.raises(InputError) as error:
        write_phantom_dataset(tmp_path / "out", **arguments)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    if "n" not in kwargs:
        with pytest.raises(InputError):
            phantom_sample(arguments["seed"], arguments["size"])


def test_cli_phantom(tmp_path: Path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["phantom", str(tmp_path / "ph"), "--n", "3", "--size", "32", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert len(ImageDataset(tmp_path / "ph")) == 3
    refused = CliRunner().invoke(app, ["phantom", str(tmp_path / "ph"), "--n", "4", "--size", "32"])
    assert refused.exit_code == 2
