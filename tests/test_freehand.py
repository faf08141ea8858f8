"""The free-hand sketch simulator: strength 0 is the synthesized sketch, more strength drifts further."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from generation.errors import InputError
from generation.freehand import (
    HandParameters,
    MemoryParameters,
    Stroke,
    edit_objects,
    file_seed,
    freehand_sketch,
    freehand_sketches_from_folder,
    remember_objects,
    render_strokes,
    warp_mask,
)
from generation.sketch import PAPER, mask_instances, sketch_from_mask


def ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 <= 1.0


def anatomy(size: int = 128) -> np.ndarray:
    """Four classes: a large and two small ellipses, and a band along the bottom frame (open contour)."""
    mask = np.zeros((size, size), np.uint8)
    mask[ellipse(mask.shape, (0.45 * size, 0.5 * size), (0.3 * size, 0.22 * size))] = 1
    mask[ellipse(mask.shape, (0.7 * size, 0.35 * size), (0.12 * size, 0.1 * size))] = 2
    mask[ellipse(mask.shape, (0.2 * size, 0.8 * size), (0.08 * size, 0.08 * size))] = 3
    mask[int(0.9 * size) :] = 4
    return mask


def ink(sketch: np.ndarray) -> np.ndarray:
    return sketch < 128


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric mean distance (px) from the ink of one sketch to the ink of the other."""
    to_a, to_b = ndimage.distance_transform_edt(~ink(a)), ndimage.distance_transform_edt(~ink(b))
    return 0.5 * float(to_b[ink(a)].mean() + to_a[ink(b)].mean())


# --- strength 0 ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128, 200])
def test_strength_zero_is_the_synthesized_sketch(size: int) -> None:
    mask = anatomy(size)
    expected = sketch_from_mask(mask)
    assert np.array_equal(freehand_sketch(mask, 0.0, 7), expected)
    assert np.array_equal(freehand_sketch(mask, 0.0, np.random.default_rng(3)), expected)


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 5), st.floats(0, 1), st.floats(0, 1), st.floats(0.05, 0.5), st.floats(0.05, 0.5)),
        min_size=0,
        max_size=4,
    ),
    st.integers(0, 2**32),
)
def test_strength_zero_equals_synthesized_for_random_masks(shapes, seed: int) -> None:
    mask = np.zeros((72, 64), np.uint8)  # not square: the simulator must not assume it
    for label, x, y, rx, ry in shapes:
        mask[ellipse(mask.shape, (x * 64, y * 72), (rx * 64, ry * 72))] = label
    assert np.array_equal(freehand_sketch(mask, 0.0, seed), sketch_from_mask(mask))


# --- randomness -----------------------------------------------------------------------------


def test_deterministic_per_seed_and_different_between_seeds() -> None:
    mask = anatomy(96)
    first = freehand_sketch(mask, 0.5, 11)
    assert np.array_equal(first, freehand_sketch(mask, 0.5, 11))
    assert np.array_equal(first, freehand_sketch(mask, 0.5, np.random.default_rng(11)))
    assert not np.array_equal(first, freehand_sketch(mask, 0.5, 12))


def test_distance_from_synthesized_grows_with_strength() -> None:
    mask = anatomy(128)
    reference = sketch_from_mask(mask)
    seeds = range(4)
    mean = {s: np.mean([chamfer(freehand_sketch(mask, s, seed), reference) for seed in seeds]) for s in (0.0, 0.5, 1.0)}
    assert mean[0.0] == 0.0
    assert 0.5 < mean[0.5] < mean[1.0]


def test_half_strength_stays_on_the_shape() -> None:
    mask = anatomy(128)
    to_contour = ndimage.distance_transform_edt(~ink(sketch_from_mask(mask)))
    for seed in range(4):
        sketch = freehand_sketch(mask, 0.5, seed)
        assert ink(sketch).sum() > 0.5 * ink(sketch_from_mask(mask)).sum()  # nothing vanished wholesale
        assert np.mean(to_contour[ink(sketch)] <= 5) > 0.7  # most ink within 5 px of the true contours


# --- output format --------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_output_is_black_on_white_with_the_mask_shape(strength: float) -> None:
    mask = anatomy(128)[:, 10:]  # 128 x 118
    for seed in range(3):
        sketch = freehand_sketch(mask, strength, seed)
        assert sketch.dtype == np.uint8 and sketch.shape == mask.shape
        assert np.mean(sketch == PAPER) > 0.8  # mostly bare paper, exactly 255
        assert sketch.min() < 64  # with real dark ink


def test_blank_mask_gives_blank_paper() -> None:
    for strength in (0.0, 1.0):
        assert np.all(freehand_sketch(np.zeros((40, 40), np.uint8), strength, 0) == PAPER)


def test_renderer_leaves_paper_exactly_white() -> None:
    points = np.array([[10.0, 10.0], [40.0, 30.0]])
    stroke = Stroke(points, width=np.array([2.0, 3.0]), pressure=np.array([0.5, 1.0]))
    sketch = render_strokes([stroke], 50, 60)
    assert sketch.shape == (50, 60)
    assert sketch[30, 40] < 64 and sketch[10, 10] < 200  # heavy end dark, light end grey
    assert np.all(sketch[:5] == PAPER) and np.all(sketch[:, 50:] == PAPER)


def test_strength_outside_range_is_rejected() -> None:
    for strength in (-0.1, 2.5):
        with pytest.raises(ValueError):
            freehand_sketch(anatomy(64), strength, 0)


# --- drawing from memory (strength 1 to 2) ------------------------------------------------------

STILL_HAND = HandParameters(**{name: 0.0 for name in ("merge_p", "drop_p", "extra_p", "simplify", "smooth", "wobble",
                                                      "tremor", "split_p", "end_offset", "end_drift", "elastic", "rotation",
                                                      "scale", "shift", "width_var", "width_wave", "pressure_var", "taper")})
NO_MEMORY = MemoryParameters(warp=0.0, outline=0.0, keep=100, rotation=0.0, scale=0.0, shift=0.0)


def test_strengths_up_to_one_give_the_same_sketches_as_before() -> None:
    # The memory errors neither act nor draw random numbers below strength 1: the sketches equal
    # those drawn with every memory error switched off. (A digest of the pixels would pin them
    # exactly, but numpy's vectorised trigonometry differs in the last bit between CPUs.)
    for strength in (0.0, 0.25, 0.5, 0.75, 1.0):
        for seed in (0, 1, 2):
            assert np.array_equal(freehand_sketch(anatomy(), strength, seed), freehand_sketch(anatomy(), strength, seed, memory=NO_MEMORY))


def test_strength_two_differs_from_one_and_stays_on_the_paper() -> None:
    corner = np.zeros((128, 128), np.uint8)  # an object against the top-left edge: shifting out would lose it
    corner[ellipse(corner.shape, (22, 22), (20, 16))] = 1
    for mask in (anatomy(), corner):
        for seed in range(6):
            one, two = freehand_sketch(mask, 1.0, seed), freehand_sketch(mask, 2.0, seed)
            assert not np.array_equal(one, two)
            assert ink(two).sum() > 0.5 * ink(freehand_sketch(mask, 0.0, seed)).sum()
            assert set(np.unique(two)) <= set(range(256)) and two.shape == mask.shape


def tilt(sketch: np.ndarray) -> float:
    """Orientation (degrees, -90 to 90) of the ink's main axis."""
    ys, xs = np.nonzero(ink(sketch))
    covariance = np.cov(np.stack([xs, ys]).astype(float))
    values, vectors = np.linalg.eigh(covariance)
    x, y = vectors[:, -1]
    return (math.degrees(math.atan2(y, x)) + 90) % 180 - 90


def test_rotation_error_is_up_to_fifteen_degrees_and_grows_with_strength() -> None:
    bar = np.zeros((128, 128), np.uint8)
    bar[58:70, 14:114] = 1  # a long horizontal bar: its outline's main axis is at 0 degrees
    only_rotation = MemoryParameters(warp=0.0, outline=0.0, keep=100, scale=0.0, shift=0.0)
    angles = []
    for seed in range(12):
        full = tilt(freehand_sketch(bar, 2.0, seed, STILL_HAND, only_rotation))
        half = tilt(freehand_sketch(bar, 1.5, seed, STILL_HAND, only_rotation))
        assert abs(full) <= 15.5 and abs(half - full / 2) < 1.0  # the same error, half as big
        angles.append(abs(full))
    assert max(angles) > 8
    assert abs(tilt(freehand_sketch(bar, 1.0, 0, STILL_HAND, only_rotation))) < 0.5


def test_scale_and_shift_errors_move_the_drawing() -> None:
    disc = ellipse((128, 128), (64, 64), (20, 20)).astype(np.uint8)
    only_scale = MemoryParameters(warp=0.0, outline=0.0, keep=100, rotation=0.0, shift=0.0)
    only_shift = MemoryParameters(warp=0.0, outline=0.0, keep=100, rotation=0.0, scale=0.0)
    reference = ink(freehand_sketch(disc, 1.0, 0, STILL_HAND, NO_MEMORY))
    ys, xs = np.nonzero(reference)
    radius = np.hypot(xs - 63.5, ys - 63.5).mean()
    ratios, offsets = [], []
    for seed in range(12):
        ys, xs = np.nonzero(ink(freehand_sketch(disc, 2.0, seed, STILL_HAND, only_scale)))
        ratios.append(np.hypot(xs - 63.5, ys - 63.5).mean() / radius)
        ys, xs = np.nonzero(ink(freehand_sketch(disc, 2.0, seed, STILL_HAND, only_shift)))
        offsets.append(max(abs(xs.mean() - 63.5), abs(ys.mean() - 63.5)))
    assert 0.73 < min(ratios) and max(ratios) < 1.27 and max(abs(r - 1) for r in ratios) > 0.1
    assert max(offsets) <= 0.1 * 128 + 1 and max(offsets) > 4


def test_warp_changes_proportions_by_about_a_tenth() -> None:
    square = np.zeros((128, 128), np.uint8)
    square[34:94, 34:94] = 1
    changes = []
    for seed in range(8):
        warped = warp_mask(square, 0.1, 0.3 * 128, np.random.default_rng(seed))
        assert set(np.unique(warped)) <= {0, 1}
        rows, columns = np.nonzero(warped.any(axis=1))[0], np.nonzero(warped.any(axis=0))[0]
        changes += [abs(len(rows) / 60 - 1), abs(len(columns) / 60 - 1)]
    assert np.array_equal(warp_mask(square, 0.0, 38.4, np.random.default_rng(0)), square)
    assert 0.05 < np.mean(changes) < 0.15


def test_remembered_objects_are_rough_outlines_of_the_biggest_few() -> None:
    mask = np.zeros((128, 128), np.uint8)
    mask[ellipse(mask.shape, (40, 40), (30, 24))] = 1
    mask[20:60, 38:42] = 0  # a narrow notch a rough outline fills in
    for k, (x, y, r) in enumerate([(100, 30, 14), (100, 90, 10), (40, 100, 7), (70, 70, 4)]):
        mask[ellipse(mask.shape, (x, y), (r, r))] = k + 2
    instances = [m for _, m in mask_instances(mask)]
    assert len(instances) == 5
    remembered = remember_objects(instances, 1.0)
    assert len(remembered) == 3  # the three biggest
    assert sorted(int(m.sum()) for m in remembered)[0] > 250
    assert remembered[0][30, 40] and not instances[0][30, 40]  # the notch is gone
    assert len(remember_objects(instances, 0.5)) == 4
    assert remember_objects(instances, 0.0) == instances


def test_object_edits_are_identity_at_zero_and_happen_at_full_strength() -> None:
    mask = np.zeros((96, 96), np.uint8)
    for k, (x, y) in enumerate([(20, 20), (30, 20), (70, 70), (70, 30)]):
        mask[ellipse(mask.shape, (x, y), (6, 6))] = k + 1  # small, two of them touching
    instances = [m for _, m in mask_instances(mask)]
    assert edit_objects(instances, 0.0, np.random.default_rng(0)) is instances
    counts = {len(edit_objects(instances, 1.0, np.random.default_rng(seed))) for seed in range(40)}
    assert counts - {len(instances)}, "no object was ever dropped, merged or added at strength 1"


# --- folders --------------------------------------------------------------------------------


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def test_folder_command_mirrors_names_and_seeds_per_file(tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    masks = {"a.png": anatomy(64), "sub/b.png": anatomy(64)[::-1]}
    for name, mask in masks.items():
        write_mask(dataset / "masks" / name, mask)
    (dataset / "images").mkdir()
    out = tmp_path / "out"
    assert freehand_sketches_from_folder(dataset, out, strength=0.5, seed=3) == 2
    for name, mask in masks.items():
        written = np.asarray(Image.open(out / name))
        assert np.array_equal(written, freehand_sketch(mask, 0.5, file_seed(3, name)))
    # A folder of masks and a single file give the same sketches for the same relative names.
    assert freehand_sketches_from_folder(dataset / "masks", tmp_path / "out2", 0.5, 3) == 2
    assert freehand_sketches_from_folder(dataset / "masks" / "a.png", tmp_path / "out3", 0.5, 3) == 1
    reference = np.asarray(Image.open(out / "a.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out2" / "a.png")), reference)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out3" / "a.png")), reference)
    # Strength 0 writes the synthesized sketches.
    freehand_sketches_from_folder(dataset, tmp_path / "out0", 0.0, 3)
    synthesized = np.asarray(Image.open(tmp_path / "out0" / "sub" / "b.png"))
    assert np.array_equal(synthesized, sketch_from_mask(masks["sub/b.png"]))


def test_folder_command_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        freehand_sketches_from_folder(tmp_path / "missing", tmp_path / "out", 0.5, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no mask images found"):
        freehand_sketches_from_folder(tmp_path / "empty", tmp_path / "out", 0.5, 0)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(photo)
    with pytest.raises(InputError, match="single-channel class-index"):
        freehand_sketches_from_folder(photo, tmp_path / "out", 0.5, 0)
    grey = tmp_path / "grey" / "x.png"
    write_mask(grey, np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8))
    with pytest.raises(InputError, match="not a class-index mask"):
        freehand_sketches_from_folder(grey.parent, tmp_path / "out", 0.5, 0)
    (tmp_path / "dataset" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match="has no masks/"):
        freehand_sketches_from_folder(tmp_path / "dataset", tmp_path / "out", 0.5, 0)
    write_mask(tmp_path / "ok" / "m.png", anatomy(32))
    for strength in (-0.1, 2.5, float("nan")):
        with pytest.raises(InputError, match=r"outside \[0, 2\]; use 0 \(synthesized\), 1 \(sloppy\) to 2 \(from memory\)"):
            freehand_sketches_from_folder(tmp_path / "ok", tmp_path / "out", strength, 0)
    assert not (tmp_path / "out").exists()  # nothing written by a failed call
