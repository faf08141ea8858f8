import numpy as np
import pytest
from scipy import ndimage

from generation.sketch import INK, PAPER, contour_strokes, line_width, mask_instances, sketch_from_mask


def two_class_mask(size: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.uint8)
    mask[(yy - size * 0.4) ** 2 + (xx - size * 0.25) ** 2 < (size * 0.15) ** 2] = 3  # left tonsil
    mask[(yy - size * 0.4) ** 2 + (xx - size * 0.75) ** 2 < (size * 0.15) ** 2] = 3  # right tonsil
    mask[int(size * 0.8) :, :] = 4  # tongue, touching the frame
    mask[2, 2] = 1  # a speck
    return mask


def test_instances_are_connected_components_per_class_without_specks():
    instances = mask_instances(two_class_mask())
    assert [c for c, _ in instances] == [3, 3, 4]
    left, right = instances[0][1], instances[1][1]
    assert not (left & right).any() and left.sum() == pytest.approx(right.sum(), rel=0.05)


def test_line_width_grows_with_resolution():
    assert [line_width(s) for s in (32, 64, 128, 191, 192, 256, 320, 512)] == [1, 1, 1, 1, 2, 2, 3, 4]


def test_sketch_draws_every_instance_contour_and_not_the_frame():
    mask = two_class_mask(128)
    sketch = sketch_from_mask(mask)
    assert sketch.shape == mask.shape and sketch.dtype == np.uint8
    assert set(np.unique(sketch)) == {INK, PAPER}
    # Every boundary pixel between different labels lies on (or next to) a line ...
    labels = mask.copy()
    labels[2, 2] = 0
    edges = (np.diff(labels, axis=0, prepend=labels[:1]) != 0) | (np.diff(labels, axis=1, prepend=labels[:, :1]) != 0)
    distance_to_line = ndimage.distance_transform_edt(sketch != INK)
    assert distance_to_line[edges].max() <= 1.5
    # ... and nothing else is drawn: no frame line along the tongue's border with the image edge.
    assert (sketch[-1, 5:-5] == PAPER).all() and (sketch[-20:, 0] == PAPER).all()
    # The speck is not an instance, so it is not drawn.
    assert (sketch[:6, :6] == PAPER).all()


def test_contours_meeting_the_frame_stay_open():
    instance = np.zeros((64, 64), bool)
    instance[40:, :] = True
    (stroke,) = contour_strokes(instance)
    assert not np.allclose(stroke[0], stroke[-1])
    closed = np.zeros((64, 64), bool)
    closed[10:30, 10:30] = True
    (ring,) = contour_strokes(closed)
    assert np.allclose(ring[0], ring[-1])


def test_contours_are_those_of_the_whole_frame_point_for_point():
    """contour_strokes traces within each mask's box: the strokes must equal the whole frame's."""
    from skimage import measure

    rng = np.random.default_rng(0)
    masks = [ndimage.binary_opening(rng.random((48, 64)) < 0.35) for _ in range(20)]
    masks += [np.pad(np.ones((10, 7), bool), ((0, 38), (57, 0))), np.ones((48, 64), bool), np.zeros((48, 64), bool)]
    masks[0][:, :] = False
    masks[0][0, 3] = True  # one pixel on the top edge
    for mask in masks:
        whole = [c[:, ::-1].astype(np.float32) for c in measure.find_contours(mask.astype(np.float32), 0.5) if len(c) >= 2]
        strokes = contour_strokes(mask)
        assert len(strokes) == len(whole)
        for stroke, expected in zip(strokes, whole):
            np.testing.assert_array_equal(stroke, expected)


def test_empty_mask_gives_blank_paper():
    assert (sketch_from_mask(np.zeros((32, 32), np.uint8)) == PAPER).all()
