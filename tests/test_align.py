"""The alignment re-ranking: contours of label maps, the aligned distance, degenerate sketches."""

import math

import numpy as np
import pytest
from PIL import Image

from generation.sketch import INK, PAPER
from retrieval.align import Alignment, aligned_distances, alignment_matcher, alignment_scores, final_score, mask_outlines, matched_distances
from retrieval.candidates import CandidateCache
from retrieval.oracle import TransformGrid


def ellipse_map(size: int, centre: tuple[float, float], axes: tuple[float, float], angle: float = 0.0) -> np.ndarray:
    """uint8 label map: class 1 inside a rotated ellipse, 0 outside."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    theta = math.radians(angle)
    dx, dy = xx - centre[0], yy - centre[1]
    u, v = dx * math.cos(theta) + dy * math.sin(theta), -dx * math.sin(theta) + dy * math.cos(theta)
    return ((u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1).astype(np.uint8)


def test_mask_outlines_draw_region_borders_but_not_the_frame():
    labels = np.zeros((2, 16, 16), np.uint8)
    labels[0, 4:12, 4:12] = 1
    labels[1, :, :8] = 2  # the left half, cut by the frame on three sides
    outlines = mask_outlines(list(labels), 16)
    ring = np.zeros((16, 16), bool)
    ring[4:12, 4:12] = True
    ring[5:11, 5:11] = False
    assert np.array_equal(outlines[0] == INK, ring)
    assert np.array_equal(np.nonzero((outlines[1] == INK).any(axis=0))[0], [7])  # only the inner edge, column 7
    assert set(np.unique(outlines)) <= {INK, PAPER}
    assert mask_outlines([labels[0]], 32).shape == (1, 32, 32)  # other sizes are resized to the sketch's


def test_the_drifted_sketch_of_a_shape_is_closest_to_that_shape_after_alignment():
    size = 64
    archive = [ellipse_map(size, (32, 32), (20, 8), 0), ellipse_map(size, (32, 32), (12, 12)),
               ellipse_map(size, (20, 40), (8, 18), 0), np.zeros((size, size), np.uint8)]
    drifted = mask_outlines([ellipse_map(size, (36, 29), (22, 9), 10)], size)[0]  # rotated 10 deg, 10 % larger, shifted
    plain = aligned_distances(drifted, archive, Alignment(grid=TransformGrid(rotations=(0.0,), scales=(1.0,), shift=0.0)))
    aligned = aligned_distances(drifted, archive, Alignment(reduction=1))
    assert np.argmin(aligned) == 0 and aligned[0] < 1.0 < plain[0]
    assert np.isinf(aligned[3]) and alignment_scores(aligned, 2.0)[3] == 0
    assert aligned_distances(drifted, [], Alignment()).shape == (0,)


@pytest.mark.parametrize("name", ["one short stroke", "all on one edge", "a single dot"])
def test_degenerate_sketches_get_distances_without_raising(name):
    size = 64
    sketch = np.full((size, size), PAPER, np.uint8)
    if name == "one short stroke":
        sketch[30, 28:34] = INK
    elif name == "all on one edge":
        sketch[:, 0] = INK
    else:
        sketch[63, 63] = INK
    archive = [ellipse_map(size, (32, 32), (20, 8)), ellipse_map(size, (8, 32), (6, 30)), np.zeros((size, size), np.uint8)]
    distances = aligned_distances(sketch, archive, Alignment())
    assert distances.shape == (3,) and np.isinf(distances[2])
    assert np.all(np.isfinite(distances[:2]) | (name == "a single dot"))  # a corner dot may leave the frame when scaled
    scores = final_score(np.array([0.5, 0.4, 0.3]), np.array([10.0, 0.0, 0.0]), 0.97, alignment_scores(distances, 2.0), 0.5)
    assert np.all(np.isfinite(scores))


def test_final_score_weighs_the_alignment_against_similarity_and_dice():
    assert final_score(0.8, 50.0, 0.9) == pytest.approx(0.9 * 0.8 + 0.1 * 0.5)
    assert final_score(0.8, 50.0, 0.9, 0.25, 0.4) == pytest.approx(0.6 * (0.9 * 0.8 + 0.1 * 0.5) + 0.4 * 0.25)
    assert final_score(0.8, 50.0, 0.9, 0.25, 0.0) == pytest.approx(final_score(0.8, 50.0, 0.9))


class CountingWorkspace:
    """What `CandidateCache` reads of a workspace: stored label maps by id, and the catalog's generation."""

    def __init__(self, masks: dict[int, np.ndarray]):
        self.masks, self.generation, self.reads = masks, 0, []

    def masks_for(self, ids):
        self.reads.append(sorted(ids))
        return {i: self.masks[i] for i in ids if i in self.masks}


def test_candidate_cache_gives_what_a_fresh_read_gives_and_reads_each_image_once():
    size = 64
    masks = {0: ellipse_map(size, (32, 32), (20, 8)), 1: ellipse_map(size, (20, 40), (8, 18)),
             2: ellipse_map(32, (16, 16), (6, 6)), 3: ellipse_map(size, (40, 30), (10, 14))}  # 2 stored at 32 px
    workspace = CountingWorkspace(masks)
    cache = CandidateCache(workspace, size, capacity=3)
    ids = [2, 0, 9]  # 9 has no stored masks
    expected = np.stack([np.asarray(Image.fromarray(masks[2]).resize((size, size), Image.NEAREST)), masks[0], np.zeros((size, size), np.uint8)])
    assert np.array_equal(cache.label_maps(ids), expected)
    sketch = mask_outlines([ellipse_map(size, (34, 31), (21, 8), 5)], size)[0]
    alignment = Alignment()
    matcher = cache.matcher(ids, alignment_matcher(size, alignment), lambda maps: mask_outlines(maps, size))
    assert np.array_equal(matched_distances(sketch, matcher), aligned_distances(sketch, [masks[i] if i in masks else expected[2] for i in ids], alignment))
    assert workspace.reads == [[0, 2, 9]]  # the matcher used the kept label maps
    cache.label_maps([0, 2])
    assert workspace.reads == [[0, 2, 9]]
    cache.label_maps([3])  # beyond capacity: 9, the least recently used, is dropped
    cache.label_maps([9, 0])
    assert workspace.reads[1:] == [[3], [9]]
    workspace.generation += 1  # an index run committed: everything is read again
    assert np.array_equal(cache.label_maps([0]), masks[0][None]) and workspace.reads[-1] == [0]
