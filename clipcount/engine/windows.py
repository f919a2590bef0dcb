"""Sliding-window inference: images of any size through a model that sees square windows.

The evaluation protocol (see the reference notes): resize the image to the window's height (384),
cut it into window x window crops every `stride` pixels along x, run all crops through the model in
as few batches as possible, and blend the overlapping density maps back into one map. A model may
ask for images taller than its window (`ClipCountConfig.image_height`): the windows then tile the
image in rows as well as columns, every `stride` pixels along y too, blended the same way along
each axis (the published windowing has one row only).

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
- Resolution. The density returned is at the resized resolution (the image's new height). Its sum is the
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DensityFn = Callable[[torch.Tensor], torch.Tensor]  # (K, 3, S, S) in [0, 1] -> (K, 1, S, S)

# "clipcount": windows end at the border, linear blending; "published": the published evaluation's.
WINDOWINGS = ("clipcount", "published")
_PUBLISHED_RAMP = 3.0  # the published blend weights are sigmoid(linspace(-3, 3, overlap))


@dataclass
class WindowPlan:
    """Where the windows of one image go. Sizes are after `resize_to_height`."""

    height: int  # image height: the window, or more for rows of windows
    width: int  # image width before padding
    padded_width: int  # max(width, window): the canvas the windows tile exactly
    starts: list[int]  # x offset of each column of windows, increasing; the last ends at padded_width
    window: int
    stride: int
    scheme: str = "clipcount"  # one of WINDOWINGS
    row_starts: list[int] = field(default_factory=lambda: [0])  # y offset of each row; the last ends at height

    @property
    def num_windows(self) -> int:
        return len(self.starts) * len(self.row_starts)

    @property
    def positions(self) -> list[tuple[int, int]]:
        """The (y, x) corner of every window, row by row: the order windows are split and merged in."""
        return [(y, x) for y in self.row_starts for x in self.starts]


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
    """Window offsets covering a (height, width) image, height >= window (use resize_to_height):
    one row of windows when height == window, rows every `stride` pixels (the last ending at the
    bottom) when taller.

    `scheme`: "clipcount" (the last window ends at the border) or "published" (see the module notes;
    one row only).
    """
    if scheme not in WINDOWINGS:
        raise ValueError(f"unknown windowing {scheme!r}; use one of {', '.join(WINDOWINGS)}")
    if height < window or (height != window and scheme == "published"):
        tall = f"{window} pixels tall" if scheme == "published" else f"at least {window} pixels tall"
        raise ValueError(f"windows need an image {tall}, not {height}; resize it with resize_to_height first")
    if width < 1:
        raise ValueError(f"image width must be positive, not {width}")
    if not 0 < stride <= window:
        raise ValueError(f"stride must be between 1 and the window size {window}, not {stride}; "
                         "a larger stride would leave columns unseen")
    if scheme == "published":
        return _published_plan(height, width, window, stride)
    padded_width = max(width, window)
    return WindowPlan(height, width, padded_width, _axis_starts(padded_width, window, stride), window, stride,
                      row_starts=_axis_starts(height, window, stride))


def _axis_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets every `stride` along an axis of `length` >= window, the last one ending at its end."""
    last = length - window
    return [min(index * stride, last) for index in range(math.ceil(last / stride) + 1)]


def _published_plan(height: int, width: int, window: int, stride: int) -> WindowPlan:
    """Right-pad by `stride - width % stride` (at least to one window), windows every `stride`."""
    if window % stride:
        raise ValueError(f"the published windowing needs a stride that divides the window {window} "
                         f"(e.g. {window // 3}), not {stride}: otherwise the last columns go unseen")
    padded_width = max(width + stride - width % stride, window)  # narrow images: one window (published crashed)
    starts = list(range(0, padded_width - window + 1, stride))
    return WindowPlan(height, width, padded_width, starts, window, stride, "published")


def window_weights(plan: WindowPlan) -> torch.Tensor:
    """Column weights of each column of windows (len(starts), window), float64; at every canvas
    column they sum to 1."""
    return _axis_weights(plan.starts, plan.window, plan.padded_width)


def row_weights(plan: WindowPlan) -> torch.Tensor:
    """Row weights of each row of windows (len(row_starts), window), float64; at every image row
    they sum to 1. A window's weight at (y, x) is its row weight at y times its column weight at x."""
    return _axis_weights(plan.row_starts, plan.window, plan.height)


def _axis_weights(starts: Sequence[int], window: int, length: int) -> torch.Tensor:
    """Linear ramps across each overlap along one axis, normalised to sum to 1: (len(starts), window)."""
    centres = torch.arange(window, dtype=torch.float64) + 0.5  # pixel centres
    profiles = []
    for index, start in enumerate(starts):
        profile = torch.ones(window, dtype=torch.float64)
        if index > 0:
            overlap = starts[index - 1] + window - start
            profile = torch.minimum(profile, centres / overlap)  # rises from the near edge
        if index < len(starts) - 1:
            overlap = start + window - starts[index + 1]
            profile = torch.minimum(profile, centres.flip(0) / overlap)  # falls to the far edge
        profiles.append(profile)
    weights = torch.stack(profiles)  # every entry > 0
    total = torch.zeros(length, dtype=torch.float64)
    for start, profile in zip(starts, weights):
        total[start:start + window] += profile
    return torch.stack([profile / total[start:start + window] for start, profile in zip(starts, weights)])


def split_windows(image: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(3, H, W) -> (K, 3, window, window) in `plan.positions` order, narrow images padded with
    their mean colour."""
    padded = _pad(image, plan)
    size = plan.window
    return torch.stack([padded[:, y:y + size, x:x + size] for y, x in plan.positions])


def merge_windows(densities: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """(K, 1, window, window) -> (1, H, W): blended by the plan's scheme, padding cropped."""
    _check_densities(densities, plan.num_windows, plan.window)
    canvas = _new_canvas(densities, plan)
    if plan.scheme == "published":
        _fold_published(canvas, densities.to(canvas.dtype), plan.starts, plan)
    else:
        _accumulate(canvas, densities.to(canvas.dtype), _blend_weights(plan, canvas), plan, 0)
    return canvas[:, :, :plan.width]


@torch.no_grad()
def count_image(
    image: torch.Tensor,
    density_fn: DensityFn,
    window: int = 384,
    stride: int = 128,
    max_batch: int = 64,
    scheme: str = "clipcount",
    height: int | None = None,
) -> tuple[torch.Tensor, WindowPlan]:
    """Density map of a whole image: (3, H, W) in [0, 1] -> ((1, height, W'), plan).

    The image is resized to `height` pixels tall (default: the window), cut into windows, and the windows go through
    `density_fn` ((K, 3, S, S) -> (K, 1, S, S) or (K, S, S)) in ceil(K / max_batch) calls, on the
    image's device (density_fn moves them to its model's device if needed). The density returned is
    at the resized resolution, on density_fn's device; its sum is the image's density mass (count =
    sum / density scale). Runs without autograd. Windows are cut per batch, so memory stays bounded
    for very wide images. `scheme`: see plan_windows.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    resized, _, _ = resize_to_height(image, height or window)
    plan = plan_windows(resized.shape[-2], resized.shape[-1], window, stride, scheme)
    padded = _pad(resized, plan)
    positions = plan.positions
    canvas: torch.Tensor | None = None
    weights: tuple[torch.Tensor, torch.Tensor] | None = None
    for first in range(0, plan.num_windows, max_batch):
        chunk = positions[first:first + max_batch]
        batch = torch.stack([padded[:, y:y + window, x:x + window] for y, x in chunk])  # (k, 3, S, S)
        densities = density_fn(batch)
        if densities.dim() == 3:
            densities = densities[:, None]
        _check_densities(densities, len(chunk), window)
        if canvas is None:
            canvas = _new_canvas(densities, plan)
            weights = None if scheme == "published" else _blend_weights(plan, canvas)
        if scheme == "published":  # one row, folded left to right, so batch by batch is the same
            _fold_published(canvas, densities.to(canvas.dtype), [x for _, x in chunk], plan)
            continue
        _accumulate(canvas, densities.to(canvas.dtype), weights, plan, first)
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
    """(1, height, padded_width) zeros, float32 at least: half-precision sums would lose counts."""
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


def _blend_weights(plan: WindowPlan, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row weights (R, S), column weights (C, S)) on the canvas's device and dtype."""
    return (row_weights(plan).to(canvas.device, canvas.dtype), window_weights(plan).to(canvas.device, canvas.dtype))


def _accumulate(canvas: torch.Tensor, densities: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor],
                plan: WindowPlan, first: int) -> None:
    """canvas (1, H, W) += densities (k, 1, S, S) of windows first..first + k - 1 (plan.positions
    order), each times its row weights (S, 1) and column weights (1, S)."""
    rows, columns = weights
    size = plan.window
    for offset, density in enumerate(densities):
        row, column = divmod(first + offset, len(plan.starts))
        y, x = plan.row_starts[row], plan.starts[column]
        canvas[:, y:y + size, x:x + size] += density * rows[row][:, None] * columns[column]


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
