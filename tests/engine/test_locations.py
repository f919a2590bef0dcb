"""find_objects on synthetic densities made of Gaussian blobs of mass 60 at known positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipcount.engine.locations import find_objects

SCALE = 60.0


def _render(points, shape=(64, 96), sigma=1.5, mass=SCALE) -> np.ndarray:
    """Sum of Gaussians of `mass` centred at (x, y) points: (H, W)."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    density = np.zeros(shape)
    for x, y in points:
        blob = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
        density += mass * blob / blob.sum()
    return density


def _max_match_distance(found: np.ndarray, truth) -> float:
    """Largest distance after pairing each true point with a distinct found point (greedy, nearest first)."""
    truth = np.asarray(truth, dtype=float)
    distance = np.linalg.norm(found[:, None, :] - truth[None, :, :], axis=2)
    worst = 0.0
    for _ in range(len(truth)):
        row, col = np.unravel_index(np.argmin(distance), distance.shape)
        worst = max(worst, distance[row, col])
        distance[row, :] = np.inf
        distance[:, col] = np.inf
    return worst


def _count(density: np.ndarray) -> float:
    return density.sum() / SCALE


def test_separate_blobs_found_exactly():
    truth = [(10, 10), (40.3, 20.6), (80, 50), (60.7, 8.2), (20, 55)]
    density = _render(truth)
    found = find_objects(density, _count(density))
    assert found.shape == (5, 2) and found.dtype == np.float64
    assert _max_match_distance(found, truth) < 0.6  # sub-pixel positions, (x, y) order


def test_touching_blobs_keep_their_own_peaks():
    truth = [(30, 30), (35, 30), (32.5, 34.5), (60, 30), (64, 33)]  # neighbours 4-5 px apart
    density = _render(truth, sigma=1.5)
    found = find_objects(density, _count(density))
    assert len(found) == 5
    assert _max_match_distance(found, truth) < 1.0


@pytest.mark.parametrize("truth", [
    [(30, 30), (33, 30.5)],  # two blobs merged into one peak
    [(30, 30), (33, 30), (31.5, 32.6)],  # three merged
    [(20, 20), (23, 21), (60, 40)],  # a merged pair next to an isolated blob
])
def test_merged_blobs_get_the_missing_points(truth):
    density = _render(truth, sigma=2.0)
    found = find_objects(density, _count(density))
    assert len(found) == len(truth)
    assert _max_match_distance(found, truth) <= 2.0


def test_flat_topped_density_still_places_every_object():
    """The published model's sigmoid caps density at 1: blobs become plateaus and merge."""
    rng = np.random.default_rng(0)
    truth = rng.uniform(4, [124, 92], size=(40, 2))
    density = np.minimum(_render(truth, shape=(96, 128), sigma=3.0), 1.0)
    found = find_objects(density, 40)
    assert len(found) == 40
    distance = np.linalg.norm(found[:, None] - truth[None], axis=2)
    assert np.mean(distance.min(axis=0) <= 4.0) >= 0.9  # nearly every object has a point on it
    assert np.mean(distance.min(axis=1) <= 4.0) >= 0.95  # and almost no point is off every object


@pytest.mark.parametrize("count,expected", [(0.0, 0), (0.49, 0), (0.5, 1), (2.5, 3), (3.49, 3), (-2.0, 0)])
def test_number_of_points_follows_the_count(count, expected):
    density = _render([(10, 10), (40, 20), (80, 50)])
    assert find_objects(density, count).shape == (expected, 2)


def test_more_points_than_peaks_and_fewer():
    truth = [(10, 10), (40, 20), (80, 50)]
    density = _render(truth)
    strongest = find_objects(density * np.linspace(1, 2, 96)[None, :], 1)  # the right-most is strongest
    assert _max_match_distance(strongest, [(80, 50)]) < 1.0
    assert len(find_objects(density, 7)) == 7  # a count above the peaks still gets all its points


def test_inputs_torch_and_degenerate_maps():
    truth = [(10, 10), (40, 20)]
    density = _render(truth)
    from_torch = find_objects(torch.tensor(density, dtype=torch.float32)[None, None], 2.0)
    np.testing.assert_allclose(from_torch, find_objects(density, 2.0), atol=1e-4)
    assert find_objects(np.zeros((32, 32)), 3).shape == (0, 2)  # no mass: nowhere to put points
    noisy = density.copy()
    noisy[0, 0] = np.nan
    noisy[5, 5] = -3.0
    assert find_objects(noisy, 2.0).shape == (2, 2)
    with pytest.raises(ValueError, match="one \\(H, W\\) map"):
        find_objects(np.zeros((2, 32, 32)), 1)
    with pytest.raises(ValueError, match="finite"):
        find_objects(density, float("nan"))


def test_deterministic():
    rng = np.random.default_rng(3)
    density = np.minimum(_render(rng.uniform(4, 60, size=(25, 2)), sigma=3.0), 1.0)
    np.testing.assert_array_equal(find_objects(density, 25), find_objects(density.copy(), 25))
