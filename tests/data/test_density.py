from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcount.data.density import DensityCache, count_inside, points_to_density


def test_sum_is_scale_times_points_including_borders_and_corners():
    points = np.array([[0, 0], [63.99, 47.99], [64, 48], [32.5, 0.2], [10, 10]], dtype=np.float32)
    density = points_to_density(points, 48, 64, sigma=1.0, scale=60.0)
    assert density.shape == (48, 64) and density.dtype == np.float32
    assert density.sum() == pytest.approx(60.0 * 5, rel=1e-4)
    assert (density >= 0).all()


def test_coincident_points_both_count():
    density = points_to_density(np.array([[10.2, 10.7], [10.2, 10.7], [10.9, 10.1]]), 32, 32)
    assert density.sum() / 60.0 == pytest.approx(3.0, rel=1e-4)
    single = points_to_density(np.array([[10.2, 10.7]]), 32, 32)
    np.testing.assert_allclose(density, 3 * single, rtol=1e-5, atol=1e-6)


def test_points_outside_are_dropped_and_countable():
    points = np.array([[-0.1, 5], [5, 40.5], [70, 3], [5, 5], [np.nan, 3]], dtype=np.float32)
    density = points_to_density(points, 40, 64)
    assert count_inside(points, 40, 64) == 1
    assert density.sum() == pytest.approx(60.0, rel=1e-4)


def test_no_points_and_no_blur():
    assert points_to_density(np.zeros((0, 2)), 8, 9).shape == (8, 9)
    assert points_to_density(np.zeros((0, 2)), 8, 9).sum() == 0
    impulses = points_to_density(np.array([[2.5, 3.5]]), 8, 9, sigma=0)
    assert impulses[3, 2] == 60.0 and impulses.sum() == 60.0


def test_peak_is_at_the_point_pixel_and_interior_matches_plain_gaussian():
    density = points_to_density(np.array([[20.5, 10.5]]), 32, 40, sigma=2.0, scale=1.0)
    assert np.unravel_index(density.argmax(), density.shape) == (10, 20)
    # Far from the borders no renormalisation happens: the peak is the sigma-2 Gaussian's.
    x = np.arange(-8, 9)
    k = np.exp(-(x**2) / 8.0)
    k /= k.sum()
    assert density.max() == pytest.approx(k.max() ** 2, rel=1e-5)


@settings(max_examples=30, deadline=None, database=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    sigma=st.floats(0.3, 4.0),
    coords=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=25),
)
def test_density_sum_property(height, width, sigma, coords):
    points = np.array([[u * width, v * height] for u, v in coords], dtype=np.float32).reshape(-1, 2)
    density = points_to_density(points, height, width, sigma=sigma, scale=60.0)
    assert density.sum() == pytest.approx(60.0 * len(points), rel=1e-3, abs=1e-3)


def test_cache_round_trip_and_key_sensitivity(tmp_path):
    cache = DensityCache(tmp_path / "cache")
    points = np.array([[3, 4], [10, 12]], dtype=np.float32)
    first = cache.get_or_make("fsc147", "1.jpg", points, 20, 30)
    files = list((tmp_path / "cache").rglob("*.npy"))
    assert len(files) == 1
    again = cache.get_or_make("fsc147", "1.jpg", points, 20, 30)
    np.testing.assert_array_equal(first, again)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    # Any change of points, size, sigma, scale or name is a different entry.
    cache.get_or_make("fsc147", "1.jpg", points + 1, 20, 30)
    cache.get_or_make("fsc147", "1.jpg", points, 20, 31)
    cache.get_or_make("fsc147", "1.jpg", points, 20, 30, sigma=2.0)
    cache.get_or_make("fsc147", "1.jpg", points, 20, 30, scale=1.0)
    cache.get_or_make("fsc147", "2.jpg", points, 20, 30)
    cache.get_or_make("carpk", "1.jpg", points, 20, 30)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 7
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_cache_recovers_from_a_damaged_file(tmp_path):
    cache = DensityCache(tmp_path)
    points = np.array([[3, 4]], dtype=np.float32)
    key = cache.key("d", "n", points, 10, 10, 1.0, 60.0)
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(b"not a numpy file")
    density = cache.get_or_make("d", "n", points, 10, 10)
    assert density.sum() == pytest.approx(60.0, rel=1e-4)
    np.testing.assert_array_equal(np.load(cache.path(key)), density)
