"""Where the density head starts: a short training run cannot afford to unlearn a bad start.

Freshly initialised, the decoder's last 1x1 convolution outputs values of order 0.3 per pixel,
thousands of objects per window, against a mean target near 0.01; AdamW moves a bias by about the
learning rate per step, so undoing that takes over a thousand steps of a short budget. Starting at
the mean target density is not right either: a softplus output (the default until it was measured
to learn too slowly, see DecoderConfig.activation) decays only slowly towards 0, and a
synthetic-recipe model started at the mean kept a floor that added ~15 objects to every scene. So
the head starts at a small fraction (HEAD_INIT_FRACTION) of the mean target density.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HEAD_INIT_FRACTION = 1 / 16


def mean_target_density(dataset: torch.utils.data.Dataset, n: int = 32) -> float:
    """The mean pixel of the density maps of the dataset's first `n` items (deterministic)."""
    if len(dataset) == 0:  # said here, before numpy would warn about the mean of nothing
        from clipcount.errors import ConfigError

        raise ConfigError("the training dataset is empty; check the dataset root and split")
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    return float(np.mean([float(item["density"].mean()) for item in items]))


def init_density_head(model: nn.Module, density: float, weight_scale: float = 0.1) -> bool:
    """Start the density output near `density` everywhere: the decoder's last convolution gets
    weights scaled by `weight_scale` and the bias that its output activation maps to `density`.
    Returns False (and changes nothing) if the decoder has no such convolution."""
    head = getattr(model.decoder, "final_conv", None)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)] if head is not None else []
    if not convs or convs[-1].bias is None:
        return False
    target = torch.tensor(max(density, 1e-6))
    activation = model.config.decoder.activation
    if activation == "softplus":
        bias = target + torch.log(-torch.expm1(-target))  # softplus^-1
    elif activation == "sigmoid":
        bias = torch.logit(target.clamp(max=0.5))
    else:  # relu, identity: the value itself
        bias = target
    with torch.no_grad():
        convs[-1].weight.mul_(weight_scale)
        convs[-1].bias.fill_(float(bias))
    return True


def start_density_head(model: nn.Module, dataset: torch.utils.data.Dataset) -> bool:
    """`init_density_head` at HEAD_INIT_FRACTION of the dataset's mean target density."""
    return init_density_head(model, HEAD_INIT_FRACTION * mean_target_density(dataset))
