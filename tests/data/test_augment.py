from __future__ import annotations

import colorsys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcount.data import augment as A
from clipcount.data.density import points_to_density
from clipcount.data.sample import CountingSample
from clipcount.errors import DataError


def blob_sample(height=60, width=80, centres=((10, 12), (40, 30), (70, 50)), seed=0) -> CountingSample:
    """Black image with a white 3x3 blob centred on each point's pixel; points at pixel centres."""
    image = np.zeros((height, width, 3), dtype=np.float32)
    for c, r in centres:
        image[r - 1:r + 2, c - 1:c + 2] = 1.0
    points = np.array([[c + 0.5, r + 0.5] for c, r in centres], dtype=np.float32)
    boxes = np.array([[c - 1, r - 1, c + 2, r + 2] for c, r in centres[:1]], dtype=np.float32)
    return CountingSample(image=image, points=points, prompt="dots", name="dots.png", boxes=boxes)


def random_sample(rng: np.random.Generator, height: int, width: int, n: int) -> CountingSample:
    image = rng.random((height, width, 3), dtype=np.float32)
    points = rng.random((n, 2)) * [width, height]
    return CountingSample(image=image, points=points, prompt="things", name="r.jpg")


def assert_points_on_blobs(sample: CountingSample, threshold: float = 0.5) -> None:
    """Every point sits on a bright pixel: image and points moved together."""
    assert len(sample.points) > 0
    for x, y in sample.points:
        r = min(int(np.floor(y)), sample.height - 1)
        c = min(int(np.floor(x)), sample.width - 1)
        assert sample.image[r, c].mean() > threshold, (x, y, sample.image[r, c])


@pytest.mark.parametrize("op", [A.hflip, A.vflip, A.rotate90, A.to_landscape])
def test_flips_and_rotation_move_points_with_pixels(op):
    out = op(blob_sample())
    assert out.count == 3
    assert_points_on_blobs(out)
    assert out.image.dtype == np.float32


def test_hflip_boxes_and_involution():
    s = blob_sample()
    out = A.hflip(s)
    np.testing.assert_allclose(out.boxes, [[80 - 12, 11, 80 - 9, 14]])
    back = A.hflip(out)
    np.testing.assert_allclose(back.points, s.points)
    np.testing.assert_array_equal(back.image, s.image)


def test_rotate90_shape_and_landscape():
    s = blob_sample(height=80, width=60, centres=((10, 12), (40, 30), (50, 70)))
    out = A.to_landscape(s)
    assert out.image.shape == (60, 80, 3)
    assert_points_on_blobs(out)
    assert A.to_landscape(out) is out


@pytest.mark.parametrize("size", [(30, 40), (120, 160), (61, 79)])
def test_resize_moves_points_with_pixels(size):
    out = A.resize(blob_sample(), *size)
    assert out.image.shape[:2] == size
    assert out.count == 3
    assert_points_on_blobs(out, threshold=0.25)


def test_resize_to_height_and_short_side():
    s = blob_sample(height=60, width=80)
    assert A.resize_to_height(s, 384).image.shape[:2] == (384, 512)
    assert A.resize_short_side(s, 30).image.shape[:2] == (30, 40)


def test_crop_keeps_window_points_and_pads():
    s = blob_sample()
    s.image += 0.1  # so that zero padding is distinguishable
    out = A.crop(s, 40, 20, 50, 50)  # reaches 10 px past the right and bottom edges
    assert out.image.shape == (50, 50, 3)
    assert out.count == 2
    assert_points_on_blobs(out)
    np.testing.assert_array_equal(out.image[:, 40:], 0)
    np.testing.assert_array_equal(out.image[40:, :], 0)
    np.testing.assert_array_equal(out.image[:40, :40], s.image[20:60, 40:80])


def test_random_crop_pads_small_images():
    s = blob_sample(height=60, width=80)
    out = A.random_crop(s, 100, np.random.default_rng(0))
    assert out.image.shape == (100, 100, 3)
    np.testing.assert_array_equal(out.image[:60, :80], s.image)
    assert out.count == 3


def test_affine_moves_points_with_pixels():
    s = blob_sample(height=100, width=120, centres=((30, 30), (60, 50), (90, 70), (50, 80)))
    m = A.affine_matrix(120, 100, angle_deg=12, scale=1.1, shear_deg=-8, tx=5, ty=-4)
    out = A.apply_affine(s, m)
    assert out.count == 4
    assert_points_on_blobs(out)


def test_affine_drops_points_that_leave_the_image():
    s = blob_sample()
    m = A.affine_matrix(80, 60, angle_deg=0, scale=1.0, shear_deg=0, tx=30, ty=0)
    out = A.apply_affine(s, m)
    assert out.count == 2  # the point at x = 70.5 moved to 100.5
    assert_points_on_blobs(out)


def test_random_affine_identity_when_ranges_are_zero():
    s = blob_sample()
    out = A.random_affine(s, np.random.default_rng(0), rotate_deg=0, scale=(1, 1), shear_deg=0, translate=0)
    np.testing.assert_allclose(out.points, s.points)
    np.testing.assert_allclose(out.image, s.image, atol=1e-6)


def test_photometric_ops_keep_points_and_range():
    rng = np.random.default_rng(1)
    s = random_sample(rng, 40, 50, 7)
    for out in (A.add_noise(s, rng, 0.1), A.gaussian_blur(s, rng), A.colour_jitter(s, rng)):
        np.testing.assert_array_equal(out.points, s.points)
        assert out.image.shape == s.image.shape and out.image.dtype == np.float32
        assert out.image.min() >= 0 and out.image.max() <= 1
        assert not np.shares_memory(out.points, s.points)


def test_colour_jitter_zero_is_identity_and_hue_matches_colorsys():
    rng = np.random.default_rng(2)
    s = random_sample(rng, 6, 7, 0)
    same = A.colour_jitter(s, rng, 0, 0, 0, 0)
    np.testing.assert_allclose(same.image, s.image, atol=1e-6)
    shifted = A._shift_hue(s.image, 0.25)
    for r, g, b in s.image.reshape(-1, 3)[:10]:
        h, sat, v = colorsys.rgb_to_hsv(r, g, b)
        expect = colorsys.hsv_to_rgb((h + 0.25) % 1.0, sat, v)
        assert any(np.allclose(px, expect, atol=1e-5) for px in shifted.reshape(-1, 3))


def test_mosaic_tiles_and_counts():
    rng = np.random.default_rng(3)
    samples = [random_sample(rng, 60, 80, n) for n in (5, 0, 9, 3)]
    out = A.mosaic(samples, 64, rng)
    assert out.image.shape == (64, 64, 3)
    assert out.prompt == "things"
    assert out.count == len(out.points)
    assert (out.points >= 0).all() and (out.points <= 64).all()
    with pytest.raises(ValueError, match="one prompt"):
        A.mosaic(samples[:3] + [CountingSample(samples[3].image, samples[3].points, "other", "o")], 64, rng)


def test_count_only_samples_refuse_geometry_that_can_hide_objects():
    s = CountingSample(np.zeros((20, 20, 3), np.float32), np.zeros((0, 2)), "cats", "c.jpg", count_override=4)
    assert A.hflip(s).count == 4
    assert A.resize(s, 10, 10).count == 4
    with pytest.raises(DataError, match="c.jpg"):
        A.random_crop(s, 8, np.random.default_rng(0))


def density_count(sample: CountingSample, scale: float = 60.0) -> float:
    return float(points_to_density(sample.points, sample.height, sample.width, 1.0, scale).sum() / scale)


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 30), height=st.integers(16, 72), width=st.integers(16, 72))
def test_count_preserving_ops_keep_count_equal_to_density(seed, n, height, width):
    rng = np.random.default_rng(seed)
    s = random_sample(rng, height, width, n)
    ops = [A.hflip, A.vflip, A.rotate90, lambda x: A.add_noise(x, rng), lambda x: A.colour_jitter(x, rng),
           lambda x: A.gaussian_blur(x, rng), lambda x: A.resize(x, height + 7, width - 5)]
    out = s
    for i in rng.permutation(len(ops)):
        out = ops[i](out)
        assert out.count == n
        assert density_count(out) == pytest.approx(n, rel=1e-3, abs=1e-3)


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 30), height=st.integers(16, 72), width=st.integers(16, 72))
def test_dropping_ops_density_equals_remaining_points(seed, n, height, width):
    rng = np.random.default_rng(seed)
    s = random_sample(rng, height, width, n)
    for out in (A.random_affine(s, rng), A.random_crop(s, 24, rng), A.random_crop(s, 96, rng)):
        assert out.count == len(out.points) <= n
        assert density_count(out) == pytest.approx(out.count, rel=1e-3, abs=1e-3)


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 20))
def test_full_policy_keeps_count_equal_to_density(seed, n):
    rng = np.random.default_rng(seed)
    cfg = A.AugmentConfig(crop_size=32, mosaic_prob=0.4, augment_prob=0.6, vflip_prob=0.3)
    s = random_sample(rng, 32, int(rng.integers(20, 60)), n)
    out = A.augment(s, rng, cfg, lambda: random_sample(rng, 32, 48, int(rng.integers(0, 10))))
    assert out.image.shape == (32, 32, 3)
    assert out.image.min() >= 0 and out.image.max() <= 1
    assert density_count(out) == pytest.approx(out.count, rel=1e-3, abs=1e-3)


def test_augment_is_deterministic_given_the_generator():
    s = random_sample(np.random.default_rng(0), 40, 70, 12)
    cfg = A.AugmentConfig(crop_size=32, augment_prob=1.0)
    a = A.augment(s, np.random.default_rng(5), cfg)
    b = A.augment(s, np.random.default_rng(5), cfg)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.points, b.points)


def test_adjacent_crops_count_a_seam_point_once():
    image = np.zeros((10, 20, 3), np.float32)
    s = CountingSample(image, [[10.0, 5.0], [20.0, 10.0], [0.0, 0.0]], "x", "seam.png")
    left, right = A.crop(s, 0, 0, 10, 10), A.crop(s, 10, 0, 10, 10)
    assert left.count + right.count == 3
    assert right.count == 2  # x = 10 is pixel column 10; x = 20 (the border) is the last column
    assert density_count(left) + density_count(right) == pytest.approx(3.0, rel=1e-4)
