"""The two training losses: the published contrastive definition, and where gradients go."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipcount.config import tiny_config
from clipcount.engine.losses import (
    density_mse_loss,
    patch_text_contrastive_loss,
    positive_patch_mask,
    count_mse_loss,
    empty_count_loss,
)
from clipcount.engine.train import TrainingObjective
from clipcount.modeling.clip_count import ClipCount


def density_with_objects(size: int, points: list[tuple[int, int]]) -> torch.Tensor:
    """(1, 1, size, size) with a unit of mass at each (row, col)."""
    density = torch.zeros(1, 1, size, size)
    for row, col in points:
        density[0, 0, row, col] = 1.0
    return density


def test_mask_marks_the_patches_that_hold_mass():
    density = density_with_objects(64, [(0, 0), (40, 63)])  # patch (0, 0) and patch (2, 3) of a 4x4 grid
    mask = positive_patch_mask(density, (4, 4)).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 0] = expected[2, 3] = True
    assert torch.equal(mask, expected)


def test_mask_matches_the_published_384_to_224_pooling():
    """Published: nearest resize 384 -> 224, max-pool 16 -> 14x14. With pool=16 we do the same."""
    torch.manual_seed(0)
    density = (torch.rand(2, 1, 384, 384) > 0.9995).float()
    published = F.max_pool2d(F.interpolate(density, size=(224, 224), mode="nearest"), 16) > 0
    ours = positive_patch_mask(density, (14, 14), pool=16)
    assert torch.equal(ours, published.flatten(1))


def test_mask_works_for_any_window_and_grid():
    density = density_with_objects(100, [(99, 99)])  # 100 px is not a multiple of the 7x7 grid
    mask = positive_patch_mask(density, (7, 7))
    assert mask.shape == (1, 49) and mask.sum() == 1 and mask[0, 48]


def test_aligned_features_give_a_low_loss_and_misaligned_a_high_one():
    grid, dim = (4, 4), 8
    text = torch.zeros(1, 1, dim)
    text[0, 0, 0] = 1.0
    density = density_with_objects(64, [(5, 5), (40, 40)])  # patches 0 and 10
    positives = positive_patch_mask(density, grid)[0]
    aligned = torch.zeros(1, 16, dim)
    aligned[0, positives, 0] = 1.0  # positives point at the text
    aligned[0, ~positives, 1] = 1.0  # negatives are orthogonal to it
    low = patch_text_contrastive_loss(aligned, text, density, grid)
    high = patch_text_contrastive_loss(-aligned, text, density, grid)
    assert low < 1e-3
    assert high > 10
    # by hand, at temperature 1: 2 positives at cos 1, 14 negatives at cos 0
    expected = -math.log(2 * math.e / (2 * math.e + 14))
    got = patch_text_contrastive_loss(aligned, text, density, grid, temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_images_without_objects_are_left_out_of_the_mean():
    grid = (2, 2)
    text = torch.randn(2, 1, 4)
    feats = torch.randn(2, 4, 4, requires_grad=True)
    density = torch.cat([density_with_objects(8, [(1, 1)]), torch.zeros(1, 1, 8, 8)])
    both = patch_text_contrastive_loss(feats, text, density, grid)
    first = patch_text_contrastive_loss(feats[:1], text[:1], density[:1], grid)
    assert both.item() == pytest.approx(first.item())
    both.backward()
    assert torch.isfinite(feats.grad).all()
    assert torch.count_nonzero(feats.grad[1]) == 0  # the empty image gets no gradient


def test_a_batch_without_objects_gives_a_zero_loss_still_in_the_graph():
    feats = torch.randn(2, 4, 4, requires_grad=True)
    loss = patch_text_contrastive_loss(feats, torch.randn(2, 1, 4), torch.zeros(2, 1, 8, 8), (2, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.count_nonzero(feats.grad) == 0


def test_contrastive_loss_checks_shapes():
    with pytest.raises(ValueError, match="grid"):
        patch_text_contrastive_loss(torch.randn(1, 15, 4), torch.randn(1, 1, 4), torch.zeros(1, 1, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="batch"):
        patch_text_contrastive_loss(torch.randn(2, 16, 4), torch.randn(1, 1, 4), torch.zeros(2, 1, 8, 8), (4, 4))


def test_density_mse_is_the_mean_over_pixels():
    pred = torch.zeros(2, 1, 4, 4)
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, 0, 0] = 4.0
    assert density_mse_loss(pred, target).item() == pytest.approx(16 / 32)
    with pytest.raises(ValueError, match="shape"):
        density_mse_loss(pred, target[:, :, :2])


def test_count_loss_sees_a_floor_that_the_mse_does_not():
    target = torch.zeros(2, 1, 384, 384)
    target[0, 0, 100, 100] = 60.0 * 3  # three objects' mass; the second map is a negative prompt (0)
    floor = target + 1e-5 * 60.0  # 1e-5 objects per pixel everywhere: 1.47 objects per window
    assert density_mse_loss(floor, target).item() < 1e-6
    extra = 384 * 384 * 1e-5
    expected = extra**2  # the same extra count on both maps
    assert count_mse_loss(floor, target, 60.0).item() == pytest.approx(expected, rel=1e-4)
    assert count_mse_loss(target, target, 60.0).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        count_mse_loss(target, target[:, :, :2], 60.0)


def test_count_weight_adds_the_count_loss_in_the_density_stage_only(tiny_batch):
    model, images, density, prompts = tiny_batch
    torch.manual_seed(1)
    plain = TrainingObjective(model, 0.07, None)(images, density * 60, prompts, 0.0, 1.0)
    torch.manual_seed(1)
    counted = TrainingObjective(model, 0.07, None, count_weight=0.5)(images, density * 60, prompts, 0.0, 1.0)
    with torch.no_grad():
        pred = model(images, prompts)
    extra = 0.5 * count_mse_loss(pred, density * 60, model.config.density_scale).item()
    # (the training path shares the prompt-free features across prompts: equal to ~1e-3, not bitwise)
    assert extra > 0 and counted[0].item() == pytest.approx(plain[0].item() + extra, rel=1e-2)
    assert counted[2].item() == pytest.approx(plain[2].item())  # the logged MSE stays the MSE
    stage_one = TrainingObjective(model, 0.07, None, count_weight=0.5)(images, density, prompts, 1.0, 0.0)
    assert stage_one[2].item() == 0.0


def test_empty_count_loss_sees_only_pairs_with_nothing_to_count():
    target = torch.cat([density_with_objects(8, [(1, 1)]), torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)])
    pred = torch.full((3, 1, 8, 8), 0.5, requires_grad=True)  # 32 / 60 objects in every map
    loss = empty_count_loss(pred, target, 60.0)
    assert loss.item() == pytest.approx((32 / 60) ** 2, rel=1e-5)  # the two empty pairs, not the first
    loss.backward()
    assert float(pred.grad[0].abs().sum()) == 0.0 and bool((pred.grad[1:] > 0).all())  # only ever pushed down
    positives = torch.cat([density_with_objects(8, [(1, 1)])] * 3)
    none = empty_count_loss(pred, positives, 60.0)
    assert none.item() == 0.0 and none.requires_grad  # no empty pair: 0, still in the graph
    with pytest.raises(ValueError, match="shape"):
        empty_count_loss(pred, target[:, :, :2], 60.0)


def test_empty_count_weight_adds_the_loss_of_negative_prompts(tiny_batch):
    model, images, density, prompts = tiny_batch
    with_negative = torch.cat([density[:1] * 60, torch.zeros_like(density[:1])])  # "cars" is absent
    torch.manual_seed(1)
    plain = TrainingObjective(model, 0.07, None)(images, with_negative, prompts, 0.0, 1.0)
    torch.manual_seed(1)
    weighted = TrainingObjective(model, 0.07, None, empty_count_weight=0.5)(images, with_negative, prompts, 0.0, 1.0)
    with torch.no_grad():
        pred = model(images, prompts)
    extra = 0.5 * float(pred[1].sum() / model.config.density_scale) ** 2
    assert extra > 0 and weighted[0].item() == pytest.approx(plain[0].item() + extra, rel=1e-2)
    assert weighted[2].item() == pytest.approx(plain[2].item())  # the logged MSE stays the MSE


@pytest.fixture(scope="module")
def tiny_batch():
    torch.manual_seed(0)
    model = ClipCount(tiny_config()).train()
    images = torch.rand(2, 3, 64, 64)
    density = torch.cat([density_with_objects(64, [(10, 10)]), density_with_objects(64, [(50, 20)])])
    return model, images, density, ["apples", "cars"]


def grads_by_module(model: ClipCount) -> dict[str, bool]:
    """Top-level module name -> whether any of its parameters received a gradient."""
    out: dict[str, bool] = {}
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        out[top] = out.get(top, False) or (param.grad is not None and bool(param.grad.abs().sum() > 0))
    return out


def test_stage_one_trains_prompts_and_contrastive_head_only(tiny_batch):
    model, images, density, prompts = tiny_batch
    model.zero_grad(set_to_none=True)
    total, contrastive, mse = TrainingObjective(model, 0.07, None)(images, density, prompts, 1.0, 0.0)
    total.backward()
    got = grads_by_module(model)
    assert got["visual_prompts"] and got["text_context"] and got["patch_feat_proj_contrast"]
    assert not got["clip"] and not got["decoder"] and not got["interaction"] and not got["patch_feat_proj"]
    assert mse.item() == 0.0 and contrastive.item() == pytest.approx(total.item())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_stage_two_trains_the_density_path_and_leaves_clip_frozen(tiny_batch):
    model, images, density, prompts = tiny_batch
    model.zero_grad(set_to_none=True)
    total, contrastive, mse = TrainingObjective(model, 0.07, None)(images, density * 60, prompts, 0.0, 1.0)
    total.backward()
    got = grads_by_module(model)
    assert got["decoder"] and got["interaction"] and got["patch_feat_proj"] and got["visual_prompts"]
    assert not got["clip"] and not got["patch_feat_proj_contrast"]
    assert contrastive.item() == 0.0 and mse.item() == pytest.approx(total.item())
