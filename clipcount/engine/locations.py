"""Object locations from a density map: as many points as the count says, where the mass is.

A density map integrates to `count * scale`; each object is a blob of mass `scale` (60). Points are
chosen in two steps, both deterministic:

1. Peaks. Local maxima of the map (scipy's maximum_filter over a (2 * min_distance + 1)^2 window;
   flat tops merged into one peak at their centre), strongest first. If there are at least K =
   round(count) of them, the K strongest are the answer.
2. Residual mass. Blobs that touch can merge into one peak, and a flat-topped map (the published
   model's sigmoid caps density at 1 per pixel) has fewer peaks than objects. The remaining points go,
   one at a time, to the maximum of a residual: a smoothed copy of the map from which a Gaussian of
   mass `scale` has been subtracted at every point chosen so far. The Gaussian's width is estimated
   from the map itself (the width a blob of mass `scale` needs to reach the typical peak height), so
   one subtraction removes about one object's worth of mass. The residual is looked at twice: smoothed
   by a blob's width to find where an object's worth of mass is missing, then smoothed half as much
   to place the point there (e.g. in one lobe of two merged blobs).

Finally each point moves to the mass-weighted centre of its 3x3 neighbourhood (in the residual map
for step-2 points), for sub-pixel positions. Points are (x, y) in the density map's pixel
coordinates, pixel centres at integers; scale them by the image / density size ratio to draw them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

_MIN_SIGMA = 1.0  # no object is narrower than a pixel or so
_MAX_SIGMA = 32.0
_PEAK_FLOOR = 1e-3  # peaks lower than this fraction of the highest one are noise, not objects


def find_objects(
    density: np.ndarray | torch.Tensor,
    count: float,
    scale: float = 60.0,
    min_distance: int = 3,
) -> np.ndarray:
    """Exactly round(count) points (K, 2) as float (x, y), peaks first, strongest first.

    `density` is one map: (H, W), (1, H, W) or (1, 1, H, W), numpy or torch. `count` is normally
    density.sum() / scale, but any count is honoured. count < 0.5, or a map without any mass (there
    is nowhere to put points), gives an empty (0, 2) array.
    """
    if not scale > 0:
        raise ValueError(f"scale (density mass per object) must be positive, not {scale}")
    target = _rounded_count(count)
    mass = _as_map(density)  # (H, W) float64, non-negative
    if target == 0 or not mass.any():
        return np.zeros((0, 2), dtype=np.float64)
    peaks, heights = _peaks(mass, min_distance)
    chosen = peaks[:target]
    if len(chosen) == target:
        return _refine(mass, chosen)
    extra, residual = _residual_points(mass, chosen, heights, target - len(chosen), scale)
    return np.concatenate([_refine(mass, chosen), _refine(residual, extra)])


def _rounded_count(count: float) -> int:
    if not math.isfinite(count):
        raise ValueError(f"count must be a finite number, not {count}")
    return max(0, math.floor(count + 0.5))  # half rounds up, unlike round()'s banker's rounding


def _as_map(density: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W), (1, H, W) or (1, 1, H, W) -> (H, W) float64 with NaN and negative values as 0."""
    if isinstance(density, torch.Tensor):
        density = density.detach().float().cpu().numpy()
    mass = np.asarray(density, dtype=np.float64)
    while mass.ndim > 2 and mass.shape[0] == 1:
        mass = mass[0]
    if mass.ndim != 2:
        raise ValueError(f"density must be one (H, W) map, not shape {tuple(np.shape(density))}")
    return np.clip(np.nan_to_num(mass, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)


def _peaks(mass: np.ndarray, min_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima as (N, 2) integer (y, x), strongest first, with their heights (N,)."""
    size = 2 * max(0, min_distance) + 1
    is_peak = (mass == ndimage.maximum_filter(mass, size=size, mode="constant", cval=0.0))
    is_peak &= mass > _PEAK_FLOOR * mass.max()
    labels, count = ndimage.label(is_peak)  # a flat top is one connected patch of equal maxima
    if count == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    index = np.arange(1, count + 1)
    centres = np.array(ndimage.center_of_mass(is_peak, labels, index)).reshape(-1, 2)  # (N, 2) (y, x)
    heights = np.asarray(ndimage.maximum(mass, labels, index), dtype=np.float64)
    points = _nearest_pixels(labels, centres)
    order = np.lexsort((points[:, 1], points[:, 0], -heights))  # strongest, then top-left first
    return points[order], heights[order]


def _nearest_pixels(labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """For each labelled patch, its pixel nearest the patch's centre (a bent flat top's centre may
    lie outside it): (N, 2) integer (y, x)."""
    ys, xs = np.nonzero(labels)
    patch = labels[ys, xs] - 1
    distance = (ys - centres[patch, 0]) ** 2 + (xs - centres[patch, 1]) ** 2
    order = np.lexsort((distance, patch))  # by patch, nearest first
    first = order[np.r_[True, patch[order][1:] != patch[order][:-1]]]
    return np.stack([ys[first], xs[first]], axis=1).astype(np.int64)


def _residual_points(
    mass: np.ndarray, chosen: np.ndarray, heights: np.ndarray, missing: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """`missing` more (y, x) points where the mass not yet explained by chosen points is.

    Two views of the residual: a coarse one (smoothed by a blob's width), whose maximum is where a
    whole object's worth of mass is missing (the small rings left around already-counted blobs of
    another shape average out there), and a fine one (half that smoothing) to place the point
    within that place (e.g. in one of the two lobes left by two merged blobs).
    """
    sigma = _blob_sigma(heights, scale)
    coarse = _ResidualMap(mass, sigma, sigma, scale)
    fine = _ResidualMap(mass, sigma / 2, sigma, scale)
    for point in chosen:
        coarse.subtract(point)
        fine.subtract(point)
    radius = max(1, math.ceil(sigma))
    extra = []
    for _ in range(missing):
        y, x = np.unravel_index(int(np.argmax(coarse.values)), mass.shape)  # first maximum: deterministic
        top, left = max(0, y - radius), max(0, x - radius)
        window = fine.values[top:y + radius + 1, left:x + radius + 1]
        dy, dx = np.unravel_index(int(np.argmax(window)), window.shape)
        point = (top + dy, left + dx)
        extra.append(point)
        coarse.subtract(point)
        fine.subtract(point)
    # Sub-pixel refinement looks at what the new points explain: the residual plus their own blobs.
    explained = np.clip(fine.values, 0.0, None)
    for point in extra:
        _add(explained, fine.kernel, point)
    return np.array(extra, dtype=np.int64).reshape(-1, 2), explained


class _ResidualMap:
    """mass smoothed by `smoothing`, minus a smoothed blob of mass `scale` per subtracted point.

    Smoothing is linear, so subtracting the smoothed blob (width sqrt(sigma^2 + smoothing^2)) from
    the smoothed map equals smoothing the raw residual."""

    def __init__(self, mass: np.ndarray, smoothing: float, sigma: float, scale: float) -> None:
        self.values = ndimage.gaussian_filter(mass, smoothing, mode="constant")
        self.kernel = _gaussian_patch(math.hypot(sigma, smoothing), scale)

    def subtract(self, point) -> None:
        _add(self.values, -self.kernel, point)


def _blob_sigma(heights: np.ndarray, scale: float) -> float:
    """Width of a Gaussian of mass `scale` whose peak is the typical peak height of this map."""
    typical = float(np.median(heights)) if len(heights) else 0.0
    if typical <= 0.0:
        return _MIN_SIGMA
    return float(np.clip(math.sqrt(scale / (2.0 * math.pi * typical)), _MIN_SIGMA, _MAX_SIGMA))


def _gaussian_patch(sigma: float, mass: float) -> np.ndarray:
    """A (2r+1, 2r+1) Gaussian of total `mass`, r = 3 sigma."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2.0 * sigma * sigma))
    return kernel * (mass / kernel.sum())


def _add(target: np.ndarray, kernel: np.ndarray, point) -> None:
    """target += kernel centred at point (y, x), clipped at the map's borders, in place."""
    radius = kernel.shape[0] // 2
    y, x = int(point[0]), int(point[1])
    top, bottom = max(0, y - radius), min(target.shape[0], y + radius + 1)
    left, right = max(0, x - radius), min(target.shape[1], x + radius + 1)
    target[top:bottom, left:right] += kernel[top - y + radius:bottom - y + radius, left - x + radius:right - x + radius]


def _refine(mass: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) integer (y, x) -> (N, 2) float (x, y) at the mass centre of each 3x3 neighbourhood."""
    refined = np.empty((len(points), 2), dtype=np.float64)
    for row, (y, x) in enumerate(points):
        top, left = max(0, y - 1), max(0, x - 1)
        patch = np.clip(mass[top:y + 2, left:x + 2], 0.0, None)
        total = patch.sum()
        if total > 0:
            ys, xs = np.mgrid[top:top + patch.shape[0], left:left + patch.shape[1]]
            refined[row] = ((xs * patch).sum() / total, (ys * patch).sum() / total)
        else:
            refined[row] = (x, y)
    return refined
