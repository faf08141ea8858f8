import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from generation.errors import InputError
from generation.registry import load_network, network_config, save_network
from generation.sketch import INK, PAPER, line_width
from generation.solov2 import (
    Instance,
    SOLOv2,
    SOLOv2Config,
    build_targets,
    dice_loss,
    focal_loss,
    level_layout,
    matrix_nms,
    points_nms,
    sketch_folder,
    solov2_loss,
)
from retrieval.metrics import dice_per_image, dice_summary


def ellipse_scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with one red ellipse (class 1) and one green ellipse (class 2)."""
    image = np.full((size, size, 3), (40, 30, 30), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for index, colour in ((1, (220, 60, 60)), (2, (60, 200, 80))):
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        ry, rx = rng.uniform(0.1, 0.22, 2) * size
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        image[inside], mask[inside] = colour, index
    return image, mask


@pytest.fixture(scope="module")
def overfit():
    """A tiny S trained for a few dozen steps on two ellipse scenes (shared by several tests)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pairs = [ellipse_scene(rng) for _ in range(2)]
    images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    config = network_config("synthesizer", "tiny", num_classes=2)
    model = SOLOv2(config)
    x = SOLOv2.normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    targets = [build_targets(m, config) for m in masks]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = solov2_loss(model(x), targets, config)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), images, masks, losses


# -- configuration ---------------------------------------------------------------------------


def test_layout_scales_with_input_size():
    grids, ranges = level_layout(800)
    assert grids == (40, 36, 24, 16, 12)
    assert ranges[0] == (1, 96) and ranges[-1] == (384, 2048)
    grids, ranges = level_layout(128)
    assert grids == (20, 18, 12, 8, 6)  # half the cells: a stride-8 map is 16 px wide at 128 px
    assert ranges[2] == pytest.approx((96 * 0.16, 384 * 0.16))
    assert level_layout(256)[0] == (40, 36, 24, 16, 12)


def test_config_round_trips_through_json_and_rejects_bad_size():
    config = network_config("synthesizer", "cpu", num_classes=6)
    again = SOLOv2Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(InputError):
        SOLOv2Config(size=100)
    with pytest.raises(InputError):
        network_config("synthesizer", "huge", num_classes=3)


def test_forward_shapes():
    config = network_config("synthesizer", "tiny", num_classes=3)
    output = SOLOv2(config)(torch.zeros(2, 3, 64, 64))
    for categories, kernels, grid in zip(output.categories, output.kernels, config.grids):
        assert categories.shape == (2, 3, grid, grid)
        assert kernels.shape == (2, config.mask_channels, grid, grid)
    assert output.mask_features.shape == (2, config.mask_channels, 16, 16)
    # Category prior 0.01 before training.
    assert torch.sigmoid(output.categories[0]).mean().item() == pytest.approx(0.01, abs=0.005)


# -- targets -----------------------------------------------------------------------------------


def test_target_assignment_centre_cell_on_the_right_level():
    config = network_config("synthesizer", "cpu", num_classes=3)  # 128 px, grids 20, 18, 12, 8, 6
    mask = np.zeros((128, 128), np.uint8)
    mask[40:80, 70:110] = 2  # a 40 x 40 square: sqrt(area) 40 -> levels 2 (15.4-61.4) and 3 (30.7-122.9)
    targets = build_targets(mask, config)
    offsets = np.cumsum((0,) + config.level_cells)
    positive = targets.positive_cells.numpy()
    levels = np.searchsorted(offsets, positive, side="right") - 1
    assert set(levels.tolist()) == {2, 3}
    assert int(targets.labels.ne(0).sum()) == len(positive) <= 18
    cy, cx = 60.0, 90.0  # mass centre
    for level in (2, 3):
        grid = config.grids[level]
        centre = offsets[level] + int(cy / 128 * grid) * grid + int(cx / 128 * grid)
        assert centre in positive and targets.labels[centre] == 2
        # Centre region (sigma 0.2 of the box = 8 px) spans at most the neighbouring cells.
        rows, cols = np.divmod(positive[levels == level] - offsets[level], grid)
        assert rows.max() - rows.min() <= 2 and cols.max() - cols.min() <= 2
    (row,) = np.nonzero(positive == centre)[0]
    small = targets.masks[targets.positive_instance[row]]
    assert small.shape == (32, 32)
    assert small[10:20, 18:27].min() == 1 and small[:10].max() == 0


def test_targets_two_instances_of_one_class_and_overlapping_ranges():
    config = network_config("synthesizer", "cpu", num_classes=3)
    mask = np.zeros((128, 128), np.uint8)
    mask[10:22, 10:22] = 1  # sqrt(area) 12 -> levels 0 and 1
    mask[60:110, 60:110] = 1  # 50 -> levels 2 and 3
    targets = build_targets(mask, config)
    offsets = np.cumsum((0,) + config.level_cells)
    levels = {int(np.searchsorted(offsets, c, side="right") - 1) for c in targets.positive_cells.tolist()}
    assert levels == {0, 1, 2, 3}
    assert len(targets.masks) == 2
    assert set(targets.positive_instance.tolist()) == {0, 1}


def test_targets_reject_unknown_class():
    config = network_config("synthesizer", "tiny", num_classes=2)
    mask = np.zeros((64, 64), np.uint8)
    mask[5:20, 5:20] = 3
    with pytest.raises(InputError):
        build_targets(mask, config)


def test_empty_mask_gives_no_positive_and_a_finite_loss():
    config = network_config("synthesizer", "tiny", num_classes=2)
    targets = build_targets(np.zeros((64, 64), np.uint8), config)
    assert len(targets.positive_cells) == 0 and int(targets.labels.sum()) == 0
    model = SOLOv2(config)
    losses = solov2_loss(model(torch.zeros(1, 3, 64, 64)), [targets], config)
    assert torch.isfinite(losses["loss"]) and losses["loss_mask"].item() == 0
    losses["loss"].backward()  # every parameter stays in the graph (matters under DDP)
    assert model.kernel_out.weight.grad is not None


# -- losses ------------------------------------------------------------------------------------


def test_focal_loss_hand_values():
    logits = torch.tensor([0.0, 0.0])
    targets = torch.tensor([1.0, 0.0])
    # p = 0.5: positive 0.25 * 0.25 * ln 2, negative 0.75 * 0.25 * ln 2.
    assert focal_loss(logits, targets).item() == pytest.approx((0.0625 + 0.1875) * math.log(2), rel=1e-5)
    # A confident correct prediction costs almost nothing; a confident wrong one costs a lot.
    assert focal_loss(torch.tensor([6.0]), torch.tensor([1.0])).item() < 1e-6
    assert focal_loss(torch.tensor([-6.0]), torch.tensor([1.0])).item() > 1.0


def test_dice_loss_hand_values():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1  # 8 pixels
    assert dice_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-3)
    assert dice_loss(1 - target, target).item() == pytest.approx(1.0, abs=1e-6)
    half = torch.full((1, 4, 4), 0.5)
    # 2 * 4 / (16 * 0.25 + 8) = 2/3
    assert dice_loss(half, target).item() == pytest.approx(1 / 3, abs=1e-3)


# -- inference ---------------------------------------------------------------------------------


def test_points_nms_keeps_local_maxima():
    # Published 2x2 window: a cell competes with its upper, left and upper-left neighbours.
    heat = torch.tensor([[[[0.1, 0.9, 0.2], [0.3, 0.8, 0.1], [0.7, 0.0, 0.0]]]])
    kept = points_nms(heat)[0, 0]
    assert kept[0, 1].item() == pytest.approx(0.9, abs=1e-6) and kept[2, 0].item() == pytest.approx(0.7, abs=1e-6)
    assert kept[1, 1] == 0 and kept[0, 2] == 0  # next to a higher cell


def test_matrix_nms_decays_duplicate_and_keeps_distinct():
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 2:10, 2:10] = True
    masks[1, 2:10, 3:10] = True  # near-duplicate of 0 (IoU 0.875)
    masks[2, 10:15, 10:15] = True  # distinct
    labels = torch.tensor([0, 0, 0])
    scores = torch.tensor([0.9, 0.8, 0.7])
    decayed = matrix_nms(masks, labels, scores, "gaussian", 2.0)
    assert decayed[0] == pytest.approx(0.9)
    assert decayed[1] == pytest.approx(0.8 * math.exp(-2 * 0.875**2), rel=1e-4)
    assert decayed[2] == pytest.approx(0.7)
    # A duplicate of another class is not suppressed.
    assert matrix_nms(masks, torch.tensor([0, 1, 0]), scores)[1] == pytest.approx(0.8)


def test_matrix_nms_of_padded_images_equals_each_image_alone():
    """postprocess runs Matrix NMS on all images at once, each padded to the largest count."""
    from generation import solov2

    rng = torch.Generator().manual_seed(0)
    images = []
    for count in (5, 2, 1):
        masks = torch.rand(count, 12, 12, generator=rng) > 0.5
        masks[1:] |= masks[:1]  # overlapping, so that scores decay
        labels = torch.zeros(count, dtype=torch.long)
        labels[4:] = 1  # the first image's last mask: another class, not suppressed by the others
        images.append((masks, labels, torch.sort(torch.rand(count, generator=rng), descending=True).values))
    width = max(len(scores) for _, _, scores in images)
    padded = [torch.zeros(3, width, 144, dtype=torch.bool), torch.full((3, width), -1), torch.zeros(3, width)]
    for i, (masks, labels, scores) in enumerate(images):
        padded[0][i, : len(scores)], padded[1][i, : len(scores)], padded[2][i, : len(scores)] = masks.flatten(1), labels, scores
    together = solov2._matrix_nms_batch(*padded, "gaussian", 2.0)
    for i, (masks, labels, scores) in enumerate(images):
        alone = matrix_nms(masks, labels, scores)
        assert (alone < scores).any() or len(scores) == 1
        torch.testing.assert_close(together[i, : len(scores)], alone, rtol=0, atol=0)


def test_overfits_two_synthetic_images(overfit):
    model, images, masks, losses = overfit
    assert losses[-1] < 0.1 * losses[0]
    results = [dice_per_image(instances, mask, 3, min_score=0.35) for instances, mask in zip(model.predict(list(images)), masks)]
    assert dice_summary(results).mean > 80


def test_predictions_and_sketch_in_canonical_format(overfit):
    model, images, masks, _ = overfit
    instances = model.predict(images[0])[0]
    assert instances and all(isinstance(i, Instance) for i in instances)
    assert [i.score for i in instances] == sorted((i.score for i in instances), reverse=True)
    assert all(i.mask.shape == (64, 64) and i.mask.dtype == bool and 1 <= i.class_index <= 2 for i in instances)
    labels = model.predict_label_map(images[:1])[0]
    assert labels.shape == (64, 64) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    sketch = model.synthesize(images[:1], 64)[0][0]
    assert sketch.shape == (64, 64) and sketch.dtype == np.uint8
    assert set(np.unique(sketch)) == {INK, PAPER} and line_width(64) == 1
    # Strokes lie on the reference ellipses' outlines (within 2 px).
    from scipy import ndimage  # scikit-image depends on scipy

    edges = np.zeros((64, 64), bool)
    for index in (1, 2):
        region = masks[0] == index
        edges |= region & ~ndimage.binary_erosion(region)
    near = ndimage.binary_dilation(edges, iterations=2)
    ink = sketch == INK
    assert (ink & near).sum() / ink.sum() > 0.9
    # Larger inputs give masks at their own size.
    big = np.asarray(Image.fromarray(images[0]).resize((96, 80)))
    assert all(i.mask.shape == (80, 96) for i in model.predict(big)[0])
    # Nothing confident enough: blank paper.
    assert np.all(model.synthesize(images[:1], 64, min_score=1.01)[0] == PAPER)


def test_a_batch_gives_the_instances_of_each_image_alone(overfit, monkeypatch):
    """postprocess works on a whole batch output at once; each image's instances must be those of its
    own slice of that output, also across output shapes and when the masks are resized in groups."""
    from generation import solov2

    model, images, _, _ = overfit
    batch = np.concatenate([images, images[::-1]])
    with torch.no_grad():
        output = model(SOLOv2.normalize(torch.from_numpy(batch).permute(0, 3, 1, 2)))
    shapes = [(64, 64), (80, 96), (64, 64), (80, 96)]
    budget = solov2._resize_groups.__defaults__[0]
    for groups_budget in (budget, 1):  # 1: every image resized on its own
        monkeypatch.setattr(solov2._resize_groups, "__defaults__", (groups_budget,))
        for mask_size in (None, 32):
            together = solov2.postprocess(output, model.config, shapes, 0.1, mask_size)
            for i, instances in enumerate(together):
                alone = solov2.postprocess(solov2.SOLOv2Output(*[[t[i : i + 1] for t in part] if isinstance(part, list) else part[i : i + 1]
                                                                 for part in output]), model.config, shapes[i : i + 1], 0.1, mask_size)[0]
                assert instances and [(j.class_index, j.score) for j in instances] == [(j.class_index, j.score) for j in alone]
                for got, want in zip(instances, alone):
                    np.testing.assert_array_equal(got.mask, want.mask)
                    assert got.mask.shape == (shapes[i] if mask_size is None else (32, 32))


def test_candidates_whose_masks_are_all_too_small_give_no_instances(overfit):
    from generation import solov2

    model, images, _, _ = overfit
    with torch.no_grad():
        output = model(SOLOv2.normalize(torch.from_numpy(images).permute(0, 3, 1, 2)))
    # Every cell a confident candidate, every mask empty (kernels 0: probability 0.5, not above it).
    output = output._replace(categories=[torch.full_like(c, 10.0) for c in output.categories],
                             kernels=[torch.zeros_like(k) for k in output.kernels])
    assert solov2.postprocess(output, model.config, [(64, 64)] * len(images), 0.35, 32) == [[] for _ in images]


def test_bad_input_raises_input_error(overfit):
    model = overfit[0]
    with pytest.raises(InputError):
        model.predict(np.zeros((64, 64), np.uint8))  # greyscale
    with pytest.raises(InputError):
        model.predict(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(InputError):
        model.predict(np.zeros((4, 4, 3), np.uint8))


def test_bundle_round_trip_and_sketch_folder(overfit, tmp_path):
    model, images, _, _ = overfit
    save_network("synthesizer", model, tmp_path / "bundle")
    loaded = load_network("synthesizer", tmp_path / "bundle")
    assert loaded.config == model.config
    with torch.no_grad():
        x = SOLOv2.normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
        assert torch.allclose(loaded(x).mask_features, model(x).mask_features)
    source = tmp_path / "images"
    (source / "sub").mkdir(parents=True)
    Image.fromarray(images[0]).save(source / "a.jpg")
    Image.fromarray(images[1]).save(source / "sub" / "b.png")
    count = sketch_folder(source, tmp_path / "out", tmp_path / "bundle", size=64, device="cpu")
    assert count == 2
    for name in ("a.png", "sub/b.png"):
        sketch = np.asarray(Image.open(tmp_path / "out" / "sketches" / name))
        labels = np.asarray(Image.open(tmp_path / "out" / "masks" / name))
        assert sketch.shape == labels.shape == (64, 64)
        assert set(np.unique(sketch)) <= {INK, PAPER} and set(np.unique(labels)) <= {0, 1, 2}
    with pytest.raises(InputError):
        load_network("synthesizer", tmp_path / "nothing")
    (source / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError):
        sketch_folder(source / "broken.png", tmp_path / "out", tmp_path / "bundle", size=64, device="cpu")


@pytest.mark.parametrize(("side", "size"), [(128, 64), (192, 64), (64, 64), (100, 64), (32, 64)])
def test_mask_resizing_matches_pil_box_and_nearest(side, size):
    """The average pooling used for whole factors gives exactly PIL's box-filtered pixels (at least
    half covered); other sizes go through PIL itself."""
    from generation.solov2 import _area_resize

    masks = np.random.default_rng(side).random((6, side, side)) < np.linspace(0.1, 0.9, 6)[:, None, None]
    method = Image.BOX if size < side else Image.NEAREST
    expected = np.stack([np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), method)) >= 128 for m in masks])
    np.testing.assert_array_equal(_area_resize(torch.from_numpy(masks), size), expected)
