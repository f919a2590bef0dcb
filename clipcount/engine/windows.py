"""Sliding-window inference: images of any size through a model that sees square windows.

The evaluation protocol (see the reference notes): resize the image to the window's height (384),
cut it into window x window crops every `stride` pixels along x, run all crops through the model in
as few batches as possible, and blend the overlapping density maps back into one map.

Choices made here, and why:
- Coverage. The last window is shifted left so that it ends exactly at the image's right edge; every
  column is covered and no padding is needed for images at least one window wide. (The published
  code floors the width to a multiple of 16 and pads to a multiple of 128 instead, which drops up to
  15 columns and feeds the model blank strips.)
- Padding. Only images narrower than one window are padded, on the right, with the image's mean
  colour: a flat, neutral area with no artificial black edge for the model to react to. The padded
  columns are cropped away after merging, along with any density the model placed there.
- Blending. Each window's density is weighted by a linear ramp across its overlap with each
  neighbour (rising from its left edge, falling to its right edge, flat 1 at the image borders),
  and the weights of all windows covering a pixel are normalised to sum to exactly 1. Every pixel is
  thus counted once, and pixels near a window's edge, where objects are cut off, lean on the window
  that sees them more centrally. With `stride == window` windows do not overlap and the weights are 1.
- Resolution. The density returned is at the resized resolution (height == window). Its sum is the
  image's density mass whatever the original size, since density is mass per pixel at the resolution
  the model saw; `resize_density` maps it to another size (e.g. the original image) keeping its sum.

The published evaluation windowing (scheme "published") is kept as an option because the published
scores can only be reproduced with it: the width is right-padded with zeros (black) by
`stride - W % stride` columns (a full stride when W is already a multiple), windows start at
0, stride, 2 * stride, ... over the padded canvas, and the windows are folded in left to right: the
columns a window shares with the canvas so far are blended with weights sigmoid(linspace(-3, 3,
window - stride)) for the incoming window, the rest of it is copied, and the result is cropped back to
W. Later windows thus weigh more in every overlap whatever the content, and the blank strip is seen
by the model; it needs a stride that divides the window (128 for 384, as published).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # (K, 3, S, S) in [0, 1] -> (K, 1, S, S)

# "clipcount": windows end at the border, linear blending; "published": the published evaluation's.
WINDOWINGS = ("clipcount", "published")
_PUBLISHED_RAMP = 3.0  # the published blend weights are sigmoid(linspace(-3, 3, overlap))


@dataclass
class WindowPlan:
    """Where the windows of one image go. Sizes are after `resize_to_height`."""

    height: int  # image height, equal to `window`
    width: int  # image width before padding
    padded_width: int  # max(width, window): the canvas the windows tile exactly
    starts: list[int]  # x offset of each window, increasing; the last ends at padded_width
    window: int
    stride: int
    scheme: str = "clipcount"  # one of WINDOWINGS

    @property
    def num_windows(self) -> int:
        return len(self.starts)


def resize_to_height(
    image: torch.Tensor, height: int = 384, antialias: bool = True
) -> tuple[torch.Tensor, float, float]:
    """(3, H, W) -> (3, height, W') with W' = round(W * height / H) (at least 1), bilinear.

    Returns (image, scale_x, scale_y), the factors that map original pixel coordinates to resized
    ones (x' = x * scale_x). An image already `height` tall is returned unchanged. Antialiasing
    matters when shrinking large photos; it makes no difference when enlarging.
    """
    _check_image(image)
    old_height, old_width = image.shape[-2:]
    width = max(1, round(old_width * height / old_height))
    if (old_height, old_width) == (height, width):
        return image, 1.0, 1.0
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bilinear",
                            align_corners=False, antialias=antialias)[0]
    return resized.to(image.dtype), width / old_width, height / old_height


def plan_windows(height: int, width: int, window: int = 384, stride: int = 128,
                 scheme: str = "clipcount") -> WindowPlan:
    """Window offsets covering a (height, width) image, height == window (use resize_to_height).

    `scheme`: "clipcount" (the last window ends at the border) or "published" (see the module notes).
    """
    if scheme not in WINDOWINGS:
        raise ValueError(f"unknown windowing {scheme!r}; use one of {', '.join(WINDOWINGS)}")
    if height != window:
        raise ValueError(
            f"windows need an image {window} pixels tall, not {height}; resize it with resize_to_height first"
        )
    if width < 1:
        raise ValueError(f"image width must be positive, not {width}")
    if not 0 < stride <= window:
        raise ValueError(f"stride must be between 1 and the window size {window}, not {stride}; "
                         "a larger stride would leave columns unseen")
    if scheme == "published":
        return _published_plan(height, width, window, stride)
    padded_width = max(width, window)
    last = padded_width - window
    count = math.ceil(last / stride) + 1
    starts = [min(index * stride, last) for index in range(count)]
    return WindowPlan(height, width, padded_width, starts, window, stride)


def _published_plan(height: int, width: int, window: int, stride: int) -> WindowPlan:
    """Right-pad by `stride - width % stride` (at least to one window), windows every `stride`."""
    if window % stride:
        raise ValueError(f"the published windowing needs a stride that divides the window {window} "
                         f"(e.g. {window // 3}), not {stride}: otherwise the last columns go unseen")
    padded_width = max(width + stride - width % stride, window)  # narrow images: one window (published crashed)
    starts = list(range(0, padded_width - window + 1, stride))
    return WindowPlan(height, width, padded_width, starts, window, stride, "published")


def window_weights(plan: WindowPlan) -> torch.Tensor:
    """Per-window column weights (K, window), float64; at every canvas column they sum to 1."""
    columns = torch.arange(plan.window, dtype=torch.float64) + 0.5  # pixel centres
    profiles = []
    for index, start in enumerate(plan.starts):
        profile = torch.ones(plan.window, dtype=torch.float64)
        if index > 0:
            overlap = plan.starts[index - 1] + plan.window - start
            profile = torch.minimum(profile, columns / overlap)  # rises from the left edge
        if index < plan.num_windows - 1:
            overlap = start + plan.window - plan.starts[index + 1]
            profile = torch.minimum(profile, columns.flip(0) / overlap)  # falls to the right edge
        profiles.append(profile)
    weights = torch.stack(profiles)  # (K, window), every entry > 0
    total = torch.zeros(plan.padded_width, dtype=torch.float64)
    for start, profile in zip(plan.starts, weights):
        total[start:start + plan.window] += profile
    return torch.stack([profile / total[start:start + plan.window] for start, profile in zip(plan.starts, weights)])


def split_windows(image: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(3, H, W) -> (K, 3, window, window), narrow images padded with their mean colour."""
    padded = _pad(image, plan)
    return torch.stack([padded[:, :, start:start + plan.window] for start in plan.starts])


def merge_windows(densities: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(K, 1, window, window) -> (1, H, W): blended by the plan's scheme, padding cropped."""
    _check_densities(densities, plan.num_windows, plan.window)
    canvas = _new_canvas(densities, plan)
    if plan.scheme == "published":
        _fold_published(canvas, densities.to(canvas.dtype), plan.starts, plan)
    else:
        weights = window_weights(plan).to(canvas.device, canvas.dtype)
        _accumulate(canvas, densities.to(canvas.dtype), weights, plan.starts)
    return canvas[:, :, :plan.width]


@torch.no_grad()
def count_image(
    image: torch.Tensor,
    density_fn: DensityFn,
    window: int = 384,
    stride: int = 128,
    max_batch: int = 64,
    scheme: str = "clipcount",
) -> tuple[torch.Tensor, WindowPlan]:
    """Density map of a whole image: (3, H, W) in [0, 1] -> ((1, window, W'), plan).

    The image is resized to `window` pixels tall, cut into windows, and the windows go through
    `density_fn` ((K, 3, S, S) -> (K, 1, S, S) or (K, S, S)) in ceil(K / max_batch) calls, on the
    image's device (density_fn moves them to its model's device if needed). The density returned is
    at the resized resolution, on density_fn's device; its sum is the image's density mass (count =
    sum / density scale). Runs without autograd. Windows are cut per batch, so memory stays bounded
    for very wide images. `scheme`: see plan_windows.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    resized, _, _ = resize_to_height(image, window)
    plan = plan_windows(window, resized.shape[-1], window, stride, scheme)
    padded = _pad(resized, plan)
    weights = window_weights(plan) if scheme == "clipcount" else None
    canvas: torch.Tensor | None = None
    for first in range(0, plan.num_windows, max_batch):
        starts = plan.starts[first:first + max_batch]
        batch = torch.stack([padded[:, :, start:start + window] for start in starts])  # (k, 3, S, S)
        densities = density_fn(batch)
        if densities.dim() == 3:
            densities = densities[:, None]
        _check_densities(densities, len(starts), window)
        if canvas is None:
            canvas = _new_canvas(densities, plan)
        if weights is None:  # the published fold runs left to right, so batch by batch is the same
            _fold_published(canvas, densities.to(canvas.dtype), starts, plan)
            continue
        chunk_weights = weights[first:first + len(starts)].to(canvas.device, canvas.dtype)
        _accumulate(canvas, densities.to(canvas.dtype), chunk_weights, starts)
    assert canvas is not None  # a plan always has at least one window
    return canvas[:, :, :plan.width], plan


def resize_density(density: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize density maps (H, W), (C, H, W) or (B, C, H, W) to (height, width), keeping each map's sum.

    Bilinear (antialiased when shrinking), then each map is rescaled so that its sum is unchanged:
    the count read from the map does not depend on the size it is shown at.
    """
    if density.dim() not in (2, 3, 4):
        raise ValueError(f"density must be (H, W), (C, H, W) or (B, C, H, W), not {tuple(density.shape)}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, not {height}x{width}")
    shape = density.shape
    maps = density.reshape(-1, 1, *shape[-2:]).float()  # (N, 1, H, W)
    resized = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    before = maps.sum(dim=(2, 3), keepdim=True)
    after = resized.sum(dim=(2, 3), keepdim=True)
    area_ratio = (shape[-2] * shape[-1]) / (height * width)
    factor = torch.where(after != 0, before / after.where(after != 0, torch.ones_like(after)),
                         torch.full_like(after, area_ratio))
    return (resized * factor).reshape(*shape[:-2], height, width).to(density.dtype)


# ---- helpers -----------------------------------------------------------------------------------

def _check_image(image: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor of shape (3, H, W), not {tuple(image.shape)}")


def _check_densities(densities: torch.Tensor, count: int, window: int) -> None:
    if tuple(densities.shape) != (count, 1, window, window):
        raise ValueError(
            f"density_fn must return ({count}, 1, {window}, {window}) for {count} windows, "
            f"not {tuple(densities.shape)}"
        )


def _new_canvas(densities: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(1, window, padded_width) zeros, float32 at least: half-precision sums would lose counts."""
    dtype = torch.promote_types(densities.dtype, torch.float32)
    return torch.zeros(1, plan.height, plan.padded_width, dtype=dtype, device=densities.device)


def _pad(image: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(3, H, W) -> (3, H, padded_width): extended with the image's mean colour (published: zeros)."""
    _check_image(image)
    if tuple(image.shape[-2:]) != (plan.height, plan.width):
        raise ValueError(f"image is {tuple(image.shape[-2:])} but the plan is for {(plan.height, plan.width)}")
    extra = plan.padded_width - plan.width
    if extra == 0:
        return image
    if plan.scheme == "published":
        return torch.cat([image, image.new_zeros(3, plan.height, extra)], dim=2)
    mean = image.mean(dim=(1, 2), keepdim=True)  # (3, 1, 1)
    return torch.cat([image, mean.expand(3, plan.height, extra)], dim=2)


def _accumulate(canvas: torch.Tensor, densities: torch.Tensor, weights: torch.Tensor, starts: list[int]) -> None:
    """canvas (1, S, W) += each window's density (k, 1, S, S) times its column weights (k, S)."""
    for density, weight, start in zip(densities, weights, starts):
        canvas[:, :, start:start + weight.shape[0]] += density * weight


def _fold_published(canvas: torch.Tensor, densities: torch.Tensor, starts: list[int], plan: WindowPlan) -> None:
    """The published composite, window by window in increasing x: canvas (1, S, W'), densities (k, 1, S, S).

    The first window is copied; each later one blends its first `window - stride` columns with the
    canvas (incoming weight sigmoid(linspace(-3, 3, overlap)), in float64 and rounded once, as the
    published code did) and copies the rest.
    """
    overlap = plan.window - plan.stride
    ramp = torch.sigmoid(torch.linspace(-_PUBLISHED_RAMP, _PUBLISHED_RAMP, overlap, dtype=torch.float64,
                                        device=canvas.device))
    for density, start in zip(densities, starts):
        if start == 0:
            canvas[:, :, :plan.window] = density
            continue
        seam = canvas[:, :, start:start + overlap].double()
        blended = (1 - ramp) * seam + ramp * density[:, :, :overlap].double()
        canvas[:, :, start:start + overlap] = blended.to(canvas.dtype)
        canvas[:, :, start + overlap:start + plan.window] = density[:, :, overlap:]
