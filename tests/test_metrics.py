import math

import numpy as np
import pytest
import torch

from retrieval.metrics import (
    Instance,
    class_masks,
    dice_per_image,
    dice_summary,
    fd_c,
    frechet_distance,
    kid_c,
    mmd2_unbiased,
)

# --- Fréchet distance ------------------------------------------------------------------------


def test_frechet_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T + np.eye(5)
    assert frechet_distance(np.ones(5), sigma, np.ones(5), sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_shifted_means_give_squared_distance():
    sigma = np.diag([1.0, 2.0, 3.0])
    shift = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(np.zeros(3), sigma, shift, sigma) == pytest.approx(float(shift @ shift))


def test_frechet_diagonal_closed_form():
    # For diagonal covariances: sum_i (sqrt(s1_i) - sqrt(s2_i))^2 + |mu1 - mu2|^2.
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)


def test_frechet_handles_singular_covariances():
    # Fewer samples than dimensions: rank-deficient covariances must not produce NaN.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 16)), rng.normal(size=(4, 16))
    value = fd_c(a, b)
    assert math.isfinite(value) and value > 0
    assert fd_c(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fd_c_sets_and_shift():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(500, 3))
    assert fd_c(features, features) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([2.0, 0.0, -1.0])
    assert fd_c(features, features + shift) == pytest.approx(5.0, rel=1e-6)  # same covariance
    assert fd_c(torch.from_numpy(features), torch.from_numpy(features + shift)) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ValueError):
        fd_c(features[:1], features)


# --- DICE ------------------------------------------------------------------------------------


def test_dice_label_maps_hand_computed():
    reference = np.zeros((4, 4), np.uint8)
    reference[0, :] = 1  # class 1: 4 pixels
    reference[3, :2] = 2  # class 2: 2 pixels
    prediction = np.zeros((4, 4), np.uint8)
    prediction[0, :2] = 1  # 2 pixels, all inside -> 2*2/(2+4) = 66.67
    prediction[3, :2] = 2  # exact -> 100
    mean, per_class = dice_per_image(prediction, reference, num_classes=4)
    assert per_class == pytest.approx({1: 200 / 3, 2: 100.0})
    assert mean == pytest.approx((200 / 3 + 100) / 2)
    assert 3 not in per_class  # absent from both: not counted


def test_dice_class_only_in_prediction_scores_zero():
    reference = np.zeros((3, 3), np.uint8)
    reference[0, 0] = 1
    prediction = reference.copy()
    prediction[2, 2] = 2  # class 2 hallucinated
    mean, per_class = dice_per_image(prediction, reference, num_classes=3)
    assert per_class == {1: 100.0, 2: 0.0}
    assert mean == pytest.approx(50.0)
    # And missed entirely (only in the reference) also scores 0.
    mean, per_class = dice_per_image(np.zeros((3, 3), np.uint8), reference, num_classes=3)
    assert per_class == {1: 0.0} and mean == 0.0


def test_dice_instances_are_unioned_per_class_and_filtered_by_score():
    reference = np.zeros((2, 4), np.uint8)
    reference[0] = 1
    left, right = np.zeros((2, 4), bool), np.zeros((2, 4), bool)
    left[0, :2], right[0, 2:] = True, True
    instances = [Instance(1, left, 0.9), (1, right, 0.8)]
    assert dice_per_image(instances, reference, 2).mean == pytest.approx(100.0)
    assert dice_per_image(instances, reference, 2, min_score=0.85).mean == pytest.approx(2 * 2 / 6 * 100)
    assert dice_per_image([], reference, 2).per_class == {1: 0.0}
    assert class_masks(instances, 3).shape == (3, 2, 4)


def test_dice_empty_image_is_nan_and_summary_skips_it():
    empty = np.zeros((2, 2), np.uint8)
    result = dice_per_image(empty, empty, 3)
    assert math.isnan(result.mean) and result.per_class == {}
    full = np.ones((2, 2), np.uint8)
    half = np.array([[1, 1], [0, 0]], np.uint8)
    results = [dice_per_image(full, full, 3), dice_per_image(half, full, 3), result]
    summary = dice_summary(results)
    assert summary.mean == pytest.approx((100 + 2 * 2 / 6 * 100) / 2)
    assert summary.per_class == pytest.approx({1: (100 + 200 / 3) / 2})
    assert (summary.images, summary.empty) == (2, 1)
    assert summary.to_dict({1: "tonsil"})["per_class"] == pytest.approx({"tonsil": (100 + 200 / 3) / 2})


def test_dice_rejects_bad_input():
    with pytest.raises(ValueError):
        dice_per_image(np.full((2, 2), 5, np.uint8), np.zeros((2, 2), np.uint8), 3)
    with pytest.raises(ValueError):
        dice_per_image(np.zeros((2, 2), np.uint8), np.zeros((3, 3), np.uint8), 3)
    with pytest.raises(ValueError):
        dice_per_image([(0, np.ones((2, 2), bool), 1.0)], np.zeros((2, 2), np.uint8), 3)


def test_kid_matches_the_direct_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.0, size=(9, 3))

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / 3 + 1) ** 3

    m, n = len(x), len(y)
    direct = (sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
              + sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
              - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n))
    assert mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-12)
    # subsets as large as the smaller set: each a direct MMD^2 of 7 rows of each
    mean, std = kid_c(x, y, subsets=5, subset_size=100, seed=3)
    picks = np.random.default_rng(3)
    values = [mmd2_unbiased(x[picks.choice(7, 7, replace=False)], y[picks.choice(9, 7, replace=False)]) for _ in range(5)]
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values))
    with pytest.raises(ValueError):
        kid_c(x[:1], y)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, same_std = kid_c(a, b, subsets=20, subset_size=200)
    shifted = [kid_c(a, b + shift, subsets=20, subset_size=200)[0] for shift in (0.25, 0.5, 1.0)]
    assert abs(same) < 2 * same_std + 1e-3  # unbiased: zero within its spread
    assert shifted[0] > abs(same) + 2 * same_std and shifted[0] < shifted[1] < shifted[2]
