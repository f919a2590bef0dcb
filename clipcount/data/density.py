"""Ground-truth density maps from point annotations, and a disk cache for them.

A density map is a unit impulse per point, Gaussian-blurred, times `scale` (60 in CLIP-Count), so
count = map.sum() / scale. Two things differ from the published code on purpose:
- coincident points (two annotations on one pixel) both count; the published code set the pixel to
  1 and lost one of them;
- every point keeps its full mass: blurring with zero padding loses the part of a point's Gaussian
  that falls outside the image, so each point is renormalised by the mass that stays inside.
Both make `map.sum() == scale * n_points_inside` hold exactly (up to float rounding).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from clipcount.data.sample import as_points

# scipy's default: the kernel reaches 4 sigma each side.
_TRUNCATE = 4.0


def point_pixels(points: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel (row, col) of each point and a mask of the points inside [0, W] x [0, H].

    Returns rows (M,), cols (M,) for the M inside points, and the (N,) inside mask. Points exactly
    on the right/bottom border belong to the last pixel.
    """
    points = as_points(points)
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    inside = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
    cols = np.minimum(np.floor(x[inside]).astype(np.int64), width - 1)
    rows = np.minimum(np.floor(y[inside]).astype(np.int64), height - 1)
    return rows, cols, inside


def count_inside(points: np.ndarray, height: int, width: int) -> int:
    """How many points `points_to_density` would keep for an image of this size."""
    return int(point_pixels(points, height, width)[2].sum())


def points_to_density(
    points: np.ndarray, height: int, width: int, sigma: float = 1.0, scale: float = 60.0
) -> np.ndarray:
    """Density map of (N, 2) (x, y) points for an image of height x width.

    Returns (H, W) float32 whose sum is `scale` times the number of points inside the image;
    points outside are dropped (use `count_inside` to know how many remain).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"density map size must be positive, got {height}x{width}")
    rows, cols, _ = point_pixels(points, height, width)
    impulses = np.zeros((height, width), dtype=np.float64)
    np.add.at(impulses, (rows, cols), 1.0)  # add.at: repeated indices accumulate
    if sigma <= 0 or len(rows) == 0:
        return (impulses * scale).astype(np.float32)
    # With zero padding, an impulse at (r, c) keeps inside_y[r] * inside_x[c] of its mass (the
    # Gaussian is separable); divide each impulse by that so every point keeps exactly 1.
    inside_x = _mass_inside(width, sigma)
    inside_y = _mass_inside(height, sigma)
    impulses[rows, cols] /= inside_y[rows] * inside_x[cols]
    density = ndimage.gaussian_filter(impulses, sigma=sigma, mode="constant", truncate=_TRUNCATE)
    return (density * scale).astype(np.float32)


def _mass_inside(length: int, sigma: float) -> np.ndarray:
    """(length,) share of a 1-D Gaussian centred on each pixel that falls inside [0, length).

    The kernel is symmetric, so this is the kernel convolved with a row of ones.
    """
    return ndimage.gaussian_filter1d(
        np.ones(length, dtype=np.float64), sigma=sigma, mode="constant", truncate=_TRUNCATE
    )


class DensityCache:
    """Density maps stored as .npy files under `root`, keyed by everything that determines them.

    The key hashes (dataset, image name, H, W, sigma, scale, point bytes), so a changed annotation
    or setting never returns a stale map. Writes are atomic (temp file + rename), so several data
    loader workers can share one cache directory.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(
        dataset: str, name: str, points: np.ndarray, height: int, width: int, sigma: float, scale: float
    ) -> str:
        digest = hashlib.sha256()
        header = f"{dataset}\0{name}\0{int(height)}\0{int(width)}\0{float(sigma)!r}\0{float(scale)!r}\0"
        digest.update(header.encode("utf-8"))
        digest.update(np.ascontiguousarray(as_points(points), dtype=np.float32).tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get_or_make(
        self,
        dataset: str,
        name: str,
        points: np.ndarray,
        height: int,
        width: int,
        sigma: float = 1.0,
        scale: float = 60.0,
    ) -> np.ndarray:
        """The (H, W) float32 map, read from the cache or computed and stored."""
        path = self.path(self.key(dataset, name, points, height, width, sigma, scale))
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == (height, width):
                    return cached
            except (OSError, ValueError):
                pass  # a truncated or foreign file: recompute and overwrite it
        density = points_to_density(points, height, width, sigma, scale)
        self._store(path, density)
        return density

    @staticmethod
    def _store(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
