"""The density head's start: a near-constant map at the asked density, for every output activation."""

from __future__ import annotations

import pytest
import torch

from clipcount.config import tiny_config
from clipcount.engine.head_init import HEAD_INIT_FRACTION, init_density_head, mean_target_density, start_density_head
from clipcount.modeling.clip_count import ClipCount


def tiny_model(activation: str) -> ClipCount:
    cfg = tiny_config()
    cfg.decoder.activation = activation
    torch.manual_seed(0)
    return ClipCount(cfg).eval()


IMAGES = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("activation", ["identity", "softplus", "sigmoid", "relu"])
def test_the_head_gives_the_asked_density(activation):
    """With the last convolution's weights scaled to 0 only its bias is left: exactly the target."""
    model = tiny_model(activation)
    assert init_density_head(model, 0.02, weight_scale=0.0)
    with torch.no_grad():
        density = model(IMAGES, ["apples", "cars"])
    assert torch.allclose(density, torch.full_like(density, 0.02), rtol=1e-4)


def test_scaled_weights_keep_a_tenth_of_the_spread():
    model = tiny_model("identity")
    with torch.no_grad():
        before = model(IMAGES, ["apples", "cars"])
        init_density_head(model, 0.02)
        after = model(IMAGES, ["apples", "cars"])
    assert after.std().item() == pytest.approx(0.1 * before.std().item(), rel=1e-3)


def test_start_uses_a_fraction_of_the_data_mean():
    data = [{"density": torch.full((1, 8, 8), 0.32)} for _ in range(4)]
    assert mean_target_density(data) == pytest.approx(0.32)
    model = tiny_model("identity")
    assert start_density_head(model, data)
    bias = model.decoder.final_conv[-1].bias.item()
    assert bias == pytest.approx(HEAD_INIT_FRACTION * 0.32)
