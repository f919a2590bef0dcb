"""The two training losses of CLIP-Count: patch-text contrastive (stage 1) and density MSE (stage 2).

Contrastive loss (the published definition, see the reference notes "Training facts"): the
ground-truth density is turned into a patch mask (a patch is positive when any of its pixels
carries density mass); each image's patch features are compared with its text embedding by cosine
similarity over a temperature, and the loss is -log(sum over positives of exp / sum over all of
exp), an InfoNCE with every other patch of the same image as a negative.

Differences from the published code, on purpose:
- Images whose crop holds no object (no positive patch) are left out of the mean (they contribute
  0 and are not counted). The published code adds 1e-5 to the positive sum instead, which gives such
  an image a large loss that pushes every patch away from the text.
- The mask is built for any grid: the density is resized (nearest) to (grid * k) and max-pooled
  k x k. The published model has k = 16 (384 -> 224 -> 14x14), CLIP's patch size; `train` passes
  the model's patch size, so it matches exactly.

Density loss: the published code multiplies a *scalar* `F.mse_loss` by a random 80% pixel mask and
renormalises, which only rescales the mean squared error by about 0.8 (a factor AdamW ignores). So
plain mean squared error over pixels is the same objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def positive_patch_mask(density: torch.Tensor, grid: tuple[int, int], pool: int | None = None) -> torch.Tensor:
    """Density (B, 1, S, S) -> mask (B, h * w) bool: patches that hold any density mass.

    `pool` is k above (default: enough pixels per patch that nearest resizing drops nothing,
    ceil(S / grid)).
    """
    if density.dim() != 4 or density.shape[1] != 1:
        raise ValueError(f"density must be (B, 1, H, W), got {tuple(density.shape)}")
    h, w = grid
    if pool is None:
        pool = max(1, math.ceil(max(density.shape[-2] / h, density.shape[-1] / w)))
    resized = F.interpolate(density.float(), size=(h * pool, w * pool), mode="nearest")
    pooled = F.max_pool2d(resized, kernel_size=pool, stride=pool)  # (B, 1, h, w)
    return (pooled > 0).flatten(1)


def patch_text_contrastive_loss(
    patch_feats: torch.Tensor,
    text: torch.Tensor,
    density: torch.Tensor,
    grid: tuple[int, int],
    temperature: float = 0.07,
    pool: int | None = None,
) -> torch.Tensor:
    """Patch features (B, N, E), text (B, 1, E), density (B, 1, S, S) -> scalar loss.

    N must equal grid[0] * grid[1] (row-major patches). The loss is the mean over images with at
    least one positive patch; a batch with none returns a zero that is still connected to the
    inputs (so every parameter gets a zero gradient, which keeps DistributedDataParallel in step).
    """
    batch, patches, _ = patch_feats.shape
    if patches != grid[0] * grid[1]:
        raise ValueError(f"{patches} patch features do not fill a {grid[0]}x{grid[1]} grid")
    if text.shape[0] != batch or density.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: patch features {batch}, text {text.shape[0]}, density {density.shape[0]}"
        )
    positives = positive_patch_mask(density, grid, pool)  # (B, N)
    logits = F.cosine_similarity(patch_feats.float(), text.float(), dim=-1) / temperature  # (B, N)
    log_all = torch.logsumexp(logits, dim=1)  # (B,)
    has_pos = positives.any(dim=1)
    # Rows without positives keep their logits here (and are dropped below): a row of only -inf
    # would give NaN gradients through logsumexp even when its loss is not used.
    pos_logits = torch.where(positives | ~has_pos[:, None], logits, torch.full_like(logits, float("-inf")))
    log_pos = torch.logsumexp(pos_logits, dim=1)  # (B,)
    if not bool(has_pos.any()):
        return logits.sum() * 0.0
    return (log_all - log_pos)[has_pos].mean()


def _check_same_shape(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"predicted density {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")


def count_mse_loss(pred: torch.Tensor, target: torch.Tensor, density_scale: float) -> torch.Tensor:
    """Densities (B, 1, H, W) -> mean over the batch of (predicted - true count)^2 (fp32).

    Why beside the density MSE: a uniform floor of 1e-5 objects per pixel costs the density MSE
    nothing (its gradient is twice the floor) but adds 1.5 objects to every 384x384 window; this
    loss sees only sums, so a floor, and any count on a prompt with nothing to count, costs it in
    full. Squared, not |error|: an L1 count loss (relative to true + 1) at weight 1e-3 drove a
    counter to answer ~0.9 for everything (the median of a batch full of negative prompts).
    """
    _check_same_shape(pred, target)
    pred_count = pred.float().sum(dim=(1, 2, 3)) / density_scale  # (B,)
    true_count = target.float().sum(dim=(1, 2, 3)) / density_scale  # (B,)
    return (pred_count - true_count).square().mean()


def empty_count_loss(pred: torch.Tensor, target: torch.Tensor, density_scale: float) -> torch.Tensor:
    """Densities (B, 1, H, W) -> mean squared predicted count over the pairs with nothing to count
    (all-zero targets: negative prompts, blank crops); 0 when there are none (fp32).

    Why only those: the density MSE barely sees diffuse mass (a floor of 0.5 objects spread over a
    256x256 window pushes each pixel back ~1e-3 as hard as one false object would), and that mass is
    what an absent class adds up to over a whole image. A count loss on every pair also pushed
    undercounted positives up everywhere, which leaked other classes into the counts (README); here
    nothing is ever pushed up.
    """
    _check_same_shape(pred, target)
    empty = target.float().sum(dim=(1, 2, 3)) == 0  # (B,)
    counts = pred.float().sum(dim=(1, 2, 3)) / density_scale  # (B,)
    if not bool(empty.any()):
        return counts.sum() * 0.0  # keeps the graph, so every process's backward matches under DDP
    return counts[empty].square().mean()


def density_mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Predicted and ground-truth density (B, 1, H, W) -> mean squared error over all pixels (fp32)."""
    _check_same_shape(pred, target)
    return F.mse_loss(pred.float(), target.float())
