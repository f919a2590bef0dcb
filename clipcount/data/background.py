"""Background crops: training windows of an image that hold no annotated object, all-zero targets.

Why: when every training crop holds objects (a few images, each resized to the window height, so
the crop is the whole image), nothing ever shows the model what "none here" looks like. A short
fine-tune then learns the images' mean density level long before it learns where the objects are,
and that level stays on empty background as a floor that adds to every count (benchmarks/finetune.py:
an empty black tile counted 140 objects). A share of crops taken where the annotation says there
is nothing gives the level a reason to be 0 there.

A background crop is the largest square of the (resized) image, at least `min_side` pixels wide,
that holds no point and has no point within `margin` pixels around it (so that no object whose
centre lies just outside reaches in); one of that size at a random position, resized to the
window. An image without such a square gives an ordinary crop instead.
"""

from __future__ import annotations

import numpy as np

from clipcount.data.density import point_pixels


def empty_square(points: np.ndarray, height: int, width: int, min_side: int, margin: int,
                 rng: np.random.Generator) -> tuple[int, int, int] | None:
    """(x0, y0, side) of a random largest point-free square of an height x width image, or None.

    points: (N, 2) (x, y) in pixels. The square [x0, x0 + side) x [y0, y0 + side) lies inside the
    image, side >= min_side, and no point's pixel is within `margin` pixels of it."""
    side_max = min(height, width)
    if side_max < min_side:
        return None
    rows, cols, _ = point_pixels(points, height, width)
    occupied = np.zeros((height + 2 * margin, width + 2 * margin), dtype=np.int32)
    np.add.at(occupied, (rows + margin, cols + margin), 1)
    integral = np.pad(occupied.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # (H + 2m + 1, W + 2m + 1)

    def free(side: int) -> np.ndarray:
        """(H - side + 1, W - side + 1) mask of square corners with nothing within the margin."""
        t, ny, nx = side + 2 * margin, height - side + 1, width - side + 1
        sums = (integral[t:t + ny, t:t + nx] - integral[:ny, t:t + nx]
                - integral[t:t + ny, :nx] + integral[:ny, :nx])
        return sums == 0

    if not free(min_side).any():
        return None
    low, high = min_side, side_max  # free(low) holds; find the largest side that does (monotone)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if free(middle).any() else (low, middle - 1)
    ys, xs = np.nonzero(free(low))
    pick = int(rng.integers(len(ys)))
    return int(xs[pick]), int(ys[pick]), int(low)
