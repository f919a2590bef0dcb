"""Sliding windows: full coverage, each pixel counted once, few model calls, sum-preserving resizes."""

from __future__ import annotations

import math

import pytest
import torch

from clipcount.engine.windows import (
    count_image,
    merge_windows,
    plan_windows,
    resize_density,
    resize_to_height,
    split_windows,
    window_weights,
)

WINDOW = 384


def _constant_density(value: float):
    def density_fn(windows: torch.Tensor) -> torch.Tensor:  # (K, 3, S, S) -> (K, 1, S, S)
        return torch.full((windows.shape[0], 1, *windows.shape[-2:]), value)
    return density_fn


def _first_channel(windows: torch.Tensor) -> torch.Tensor:
    return windows[:, :1].clone()


@pytest.mark.parametrize("width", [1, 100, 383, 384, 385, 500, 777, 1024, 5000])
@pytest.mark.parametrize("stride", [1, 128, 192, 256, 384])
def test_plan_covers_every_column(width, stride):
    plan = plan_windows(WINDOW, width, WINDOW, stride)
    assert plan.padded_width == max(width, WINDOW)
    assert plan.starts[0] == 0 and plan.starts[-1] + WINDOW == plan.padded_width
    gaps = [b - a for a, b in zip(plan.starts, plan.starts[1:])]
    assert all(0 < gap <= stride for gap in gaps)  # increasing, no uncovered columns
    assert plan.num_windows == math.ceil((plan.padded_width - WINDOW) / stride) + 1


@pytest.mark.parametrize("height", [384, 385, 500, 768, 1000])
@pytest.mark.parametrize("stride", [100, 128, 256])
def test_taller_images_get_rows_of_windows_covering_every_row(height, stride):
    window = 256
    plan = plan_windows(height, 700, window, stride)
    assert plan.row_starts[0] == 0 and plan.row_starts[-1] + window == height
    gaps = [b - a for a, b in zip(plan.row_starts, plan.row_starts[1:])]
    assert all(0 < gap <= stride for gap in gaps)
    assert plan.num_windows == len(plan.row_starts) * len(plan.starts) == len(plan.positions)
    assert plan.positions[:len(plan.starts)] == [(0, x) for x in plan.starts]  # row by row


@pytest.mark.parametrize(("height", "width"), [(384, 640), (500, 300), (300, 1000)])
def test_rows_and_columns_count_every_pixel_once(height, width):
    plan = plan_windows(height, width, 256, 100)
    merged = merge_windows(torch.ones(plan.num_windows, 1, 256, 256), plan)
    assert merged.shape == (1, height, width)
    assert torch.allclose(merged, torch.ones_like(merged), atol=1e-6)
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1))
    windows = split_windows(image, plan)
    assert windows.shape == (plan.num_windows, 3, 256, 256)
    assert torch.allclose(merge_windows(windows[:, :1], plan), image[:1], atol=1e-5)  # a pure copy survives


def test_count_image_resizes_to_the_asked_height_and_tiles_it():
    image = torch.rand(3, 192, 320, generator=torch.Generator().manual_seed(2))
    calls = []

    def copy_first_channel(windows: torch.Tensor) -> torch.Tensor:
        calls.append(windows.shape[0])
        return windows[:, :1].clone()

    density, plan = count_image(image, copy_first_channel, window=128, stride=64, max_batch=3, height=192)
    assert density.shape == (1, 192, 320) and len(plan.row_starts) == 2
    assert sum(calls) == plan.num_windows and max(calls) <= 3
    assert torch.allclose(density, image[:1], atol=1e-5)


def test_plan_rejects_bad_settings():
    with pytest.raises(ValueError, match="resize_to_height"):
        plan_windows(300, 800)  # shorter than the window
    with pytest.raises(ValueError, match="resize_to_height"):
        plan_windows(500, 800, scheme="published")  # the published windowing has one row
    with pytest.raises(ValueError, match="stride"):
        plan_windows(WINDOW, 800, WINDOW, 500)
    with pytest.raises(ValueError, match="stride"):
        plan_windows(WINDOW, 800, WINDOW, 0)


@pytest.mark.parametrize("width", [100, 500, 777, 1024])
@pytest.mark.parametrize("stride", [128, 192, 256, 384])
def test_weights_sum_to_one_and_are_positive(width, stride):
    plan = plan_windows(WINDOW, width, WINDOW, stride)
    weights = window_weights(plan)
    assert weights.shape == (plan.num_windows, WINDOW) and (weights > 0).all()
    total = torch.zeros(plan.padded_width, dtype=torch.float64)
    for start, weight in zip(plan.starts, weights):
        total[start:start + WINDOW] += weight
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_no_overlap_means_unit_weights():
    plan = plan_windows(WINDOW, 3 * WINDOW, WINDOW, WINDOW)
    assert plan.starts == [0, WINDOW, 2 * WINDOW]
    assert (window_weights(plan) == 1).all()


@pytest.mark.parametrize("width", [384, 500, 777, 1024])
@pytest.mark.parametrize("stride", [128, 192, 256, 384])
def test_constant_density_counts_each_pixel_once(width, stride):
    image = torch.rand(3, WINDOW, width)
    density, plan = count_image(image, _constant_density(0.25), WINDOW, stride)
    assert density.shape == (1, WINDOW, width) and plan.width == width
    torch.testing.assert_close(density, torch.full_like(density, 0.25))
    assert density.sum().item() == pytest.approx(0.25 * WINDOW * width, rel=1e-6)


@pytest.mark.parametrize("size", [(1000, 300), (800, 100), (384, 200), (2000, 1000)])
def test_portrait_and_other_heights(size):
    height, width = size
    density, plan = count_image(torch.rand(3, height, width), _constant_density(1.0), WINDOW, 128)
    expected_width = round(width * WINDOW / height)
    assert density.shape == (1, WINDOW, expected_width) and plan.width == expected_width
    assert plan.padded_width == max(expected_width, WINDOW)
    assert density.sum().item() == pytest.approx(WINDOW * expected_width, rel=1e-6)


@pytest.mark.parametrize("width", [150, 384, 500, 777, 1024])
@pytest.mark.parametrize("stride", [128, 192, 384])
def test_merge_of_split_reproduces_the_map(width, stride):
    image = torch.rand(3, WINDOW, width)
    plan = plan_windows(WINDOW, width, WINDOW, stride)
    windows = split_windows(image, plan)
    assert windows.shape == (plan.num_windows, 3, WINDOW, WINDOW)
    merged = merge_windows(windows[:, :1], plan)
    torch.testing.assert_close(merged, image[:1], rtol=1e-6, atol=1e-7)
    via_count, _ = count_image(image, _first_channel, WINDOW, stride, max_batch=2)
    torch.testing.assert_close(via_count, image[:1], rtol=1e-6, atol=1e-7)


def test_narrow_images_padded_with_mean_colour():
    image = torch.zeros(3, WINDOW, 100)
    image[1] = 0.5
    windows = split_windows(image, plan_windows(WINDOW, 100))
    assert windows.shape == (1, 3, WINDOW, WINDOW)
    torch.testing.assert_close(windows[0, :, :, 100:], image[:, :, :1].expand(3, WINDOW, WINDOW - 100))


@pytest.mark.parametrize("max_batch,width", [(64, 1024), (2, 1024), (1, 777), (3, 384), (5, 5000)])
def test_density_fn_called_in_few_batches(max_batch, width):
    calls: list[int] = []

    def density_fn(windows):
        calls.append(windows.shape[0])
        return torch.ones(windows.shape[0], WINDOW, WINDOW)  # (K, S, S) is accepted too

    _, plan = count_image(torch.rand(3, WINDOW, width), density_fn, WINDOW, 128, max_batch)
    assert len(calls) == math.ceil(plan.num_windows / max_batch)
    assert sum(calls) == plan.num_windows and max(calls) <= max_batch


def test_small_window_and_half_precision_output():
    def half_fn(windows):
        return torch.ones(windows.shape[0], 1, 64, 64, dtype=torch.float16)

    density, plan = count_image(torch.rand(3, 64, 200), half_fn, window=64, stride=16)
    assert density.dtype == torch.float32 and density.shape == (1, 64, 200)
    assert density.sum().item() == pytest.approx(64 * 200, rel=1e-5)
    assert plan.window == 64 and plan.stride == 16


def test_bad_density_fn_output_is_named():
    with pytest.raises(ValueError, match="density_fn must return"):
        count_image(torch.rand(3, WINDOW, 500), lambda w: torch.ones(w.shape[0], 2, WINDOW, WINDOW))
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        count_image(torch.rand(1, 3, WINDOW, 500), _constant_density(1.0))


def test_blending_prefers_central_windows():
    """Windows that disagree: each pixel seen by one window only takes that window's value."""
    plan = plan_windows(WINDOW, 640, WINDOW, 128)  # starts 0, 128, 256
    values = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 1, WINDOW, WINDOW)
    merged = merge_windows(values, plan)[0, 0]
    assert merged[0].item() == pytest.approx(1.0) and merged[-1].item() == pytest.approx(3.0)
    assert merged[320].item() == pytest.approx(2.0, abs=0.35)  # window 1's centre
    assert bool((merged[1:] >= merged[:-1] - 1e-6).all())  # smooth, monotone transitions


def test_resize_to_height():
    image = torch.rand(3, 768, 1000)
    resized, scale_x, scale_y = resize_to_height(image, WINDOW)
    assert resized.shape == (3, WINDOW, 500)
    assert (scale_x, scale_y) == (0.5, 0.5)
    assert resize_to_height(resized, WINDOW)[0] is resized
    tall, scale_x, scale_y = resize_to_height(torch.rand(3, 100, 30), WINDOW)
    assert tall.shape == (3, WINDOW, 115) and scale_y == pytest.approx(3.84)
    assert scale_x == pytest.approx(115 / 30)


@pytest.mark.parametrize("shape", [(50, 70), (1, 384, 777), (2, 1, 40, 40)])
@pytest.mark.parametrize("target", [(384, 500), (17, 23), (50, 70)])
def test_resize_density_keeps_the_sum(shape, target):
    density = torch.rand(shape)
    resized = resize_density(density, *target)
    assert resized.shape == (*shape[:-2], *target)
    sums_before = density.reshape(-1, *shape[-2:]).sum(dim=(1, 2))
    sums_after = resized.reshape(-1, *target).sum(dim=(1, 2))
    torch.testing.assert_close(sums_after, sums_before, rtol=1e-5, atol=1e-5)
    zeros = resize_density(torch.zeros(shape), *target)
    assert zeros.abs().sum() == 0


# ---- the published evaluation windowing --------------------------------------------------------

@pytest.mark.parametrize("width, padded, starts", [
    (576, 640, [0, 128, 256]),  # 128 - 576 % 128 = 64 columns of padding
    (512, 640, [0, 128, 256]),  # already a multiple: a full stride of padding, as published
    (683, 768, [0, 128, 256, 384]),
    (300, 384, [0]),  # narrow: one window (the published code had none and crashed)
])
def test_published_plan_pads_to_a_multiple_of_the_stride(width, padded, starts):
    plan = plan_windows(WINDOW, width, WINDOW, 128, "published")
    assert (plan.padded_width, plan.starts) == (padded, sorted(set(starts)))


def test_published_plan_needs_a_stride_that_divides_the_window():
    with pytest.raises(ValueError, match="divides the window"):
        plan_windows(WINDOW, 800, WINDOW, 100, "published")
    with pytest.raises(ValueError, match="unknown windowing"):
        plan_windows(WINDOW, 800, WINDOW, 128, "fancy")


def test_published_blending_by_hand():
    """Three windows of 1, 2, 3 on 640 columns: the seams are sigmoid ramps towards the later window."""
    plan = plan_windows(WINDOW, 576, WINDOW, 128, "published")
    values = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1).expand(3, 1, WINDOW, WINDOW)
    merged = merge_windows(values, plan)[0, 0].double()
    ramp = torch.sigmoid(torch.linspace(-3, 3, 256, dtype=torch.float64))
    first = (1 - ramp) * 1 + ramp * 2  # window 1 over window 0, columns 128..383
    expected = torch.cat([torch.ones(128), first[:128], (1 - ramp[:128]) * first[128:] + ramp[:128] * 3,
                          (1 - ramp[128:]) * 2 + ramp[128:] * 3, torch.full((128,), 3.0)])[:576]
    assert merged.shape == (576,)
    assert torch.allclose(merged, expected.double(), atol=1e-6)


def test_published_padding_is_black_and_batches_do_not_change_the_result():
    image = torch.rand(3, WINDOW, 700)
    plan = plan_windows(WINDOW, 700, WINDOW, 128, "published")
    windows = split_windows(image, plan)
    assert bool((windows[-1][:, :, 700 - plan.starts[-1]:] == 0).all())
    all_at_once = merge_windows(windows[:, :1], plan)
    batched, _ = count_image(image, _first_channel, WINDOW, 128, max_batch=2, scheme="published")
    assert torch.allclose(all_at_once, batched)
