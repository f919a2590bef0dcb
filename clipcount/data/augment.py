"""Geometric and photometric augmentation that moves points with pixels, so counts stay right.

Every geometric op maps the image and the points (and example boxes) with the same transform, in
the continuous pixel convention of `clipcount.data.sample` (which is Pillow's). Ops that can push
points out of view (crop, affine, mosaic) drop those points: the count is then the number of
points still visible, which is what the cropped image shows. Photometric ops leave points alone.

Randomness always comes from a `numpy.random.Generator` argument; nothing here touches global RNG
state, so a (seed, epoch, index) triple reproduces a training sample exactly.

Images smaller than the crop are zero-padded on the right/bottom (not resized up), so object
scale stays that of the 384-high training images; the padding holds no points.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from clipcount.data.sample import CountingSample
from clipcount.errors import DataError

PointMap = Callable[[np.ndarray], np.ndarray]  # (N, 2) -> (N, 2)


@dataclass
class AugmentConfig:
    """The published (CounTR-derived) training policy; see `augment`."""

    mosaic_prob: float = 0.3  # share of samples built as a 2x2 mosaic of same-class crops
    augment_prob: float = 0.2  # share of the rest that get noise, jitter, blur, affine, flips
    noise_sigma: float = 0.1  # std of additive Gaussian noise on [0, 1] pixels
    jitter: tuple[float, float, float, float] = (0.3, 0.15, 0.2, 0.2)  # brightness, contrast, saturation, hue
    blur_prob: float = 1.0  # within the augment branch (CounTR always blurs there)
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # torchvision GaussianBlur's default range
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.8, 1.2)
    shear_deg: float = 10.0
    translate: float = 0.2  # fraction of width / height
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0  # the published policy flips horizontally only
    crop_size: int = 384
    mosaic_min_crop: float = 0.65  # mosaic tiles come from squares of 0.65..1 x crop_size (CounTR: 250..384)


# ---- helpers ----------------------------------------------------------------------------------

def _transform_boxes(boxes: np.ndarray | None, fn: PointMap, width: int, height: int) -> np.ndarray | None:
    """Map each box's 4 corners, take their bounding box, clip to the image, drop empty boxes."""
    if boxes is None:
        return None
    if len(boxes) == 0:
        return boxes.copy()
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1], 1), np.stack([x1, y2], 1), np.stack([x2, y2], 1), np.stack([x2, y1], 1)], 1)
    mapped = fn(corners.reshape(-1, 2)).reshape(-1, 4, 2)  # (K, 4, 2)
    out = np.concatenate([mapped.min(1), mapped.max(1)], axis=1)  # (K, 4)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out[keep].astype(np.float32)


def _visible(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Mask of points inside [0, W] x [0, H] (the closed image rectangle)."""
    x, y = points[:, 0], points[:, 1]
    return (x >= 0) & (x <= width) & (y >= 0) & (y <= height)


def _geometric(
    sample: CountingSample, image: np.ndarray, fn: PointMap, drops_points: bool, keep: np.ndarray | None = None
) -> CountingSample:
    """A new sample with `image` and the points/boxes mapped by `fn` (dropping those out of view).

    `keep` (N,) optionally selects the source points to map (a crop decides by source pixel).

    A count-only sample (no points, `count_override` set) cannot go through an op that may hide
    objects, since nobody knows which would be hidden.
    """
    height, width = image.shape[:2]
    if drops_points and sample.count_override is not None and len(sample.points) == 0:
        raise DataError(
            f"{sample.name}: has a count but no points, so it cannot be cropped or warped; "
            "use a dataset with point annotations for training"
        )
    points = sample.points if keep is None else sample.points[keep]
    points = fn(points.astype(np.float64)) if len(points) else points
    if drops_points and len(points):
        points = points[_visible(points, width, height)]
    return CountingSample(
        image=np.ascontiguousarray(image, dtype=np.float32),
        points=np.asarray(points, dtype=np.float32).reshape(-1, 2),
        prompt=sample.prompt,
        name=sample.name,
        boxes=_transform_boxes(sample.boxes, fn, width, height),
        count_override=sample.count_override,
    )


def _per_channel(image: np.ndarray, op: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """Apply a Pillow op to each channel as a float ("F") image, keeping float precision."""
    channels = [np.asarray(op(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))))
                for c in range(image.shape[2])]
    return np.stack(channels, axis=-1).astype(np.float32)


def _photometric(sample: CountingSample, image: np.ndarray) -> CountingSample:
    return dataclasses.replace(sample, image=np.clip(image, 0.0, 1.0).astype(np.float32),
                               points=sample.points.copy())


# ---- resizing and orientation -----------------------------------------------------------------

def resize(sample: CountingSample, height: int, width: int) -> CountingSample:
    """Resize to height x width (bilinear, antialiased when shrinking); points scale with it."""
    if (height, width) == (sample.height, sample.width):
        return sample
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize {sample.name} to {width}x{height}")
    sx, sy = width / sample.width, height / sample.height
    image = _per_channel(sample.image, lambda im: im.resize((width, height), Image.BILINEAR))
    return _geometric(sample, np.clip(image, 0, 1), lambda p: p * np.array([sx, sy]), drops_points=False)


def resize_to_height(sample: CountingSample, height: int) -> CountingSample:
    """Resize keeping the aspect ratio so the image is `height` pixels high."""
    width = max(1, round(sample.width * height / sample.height))
    return resize(sample, height, width)


def resize_short_side(sample: CountingSample, short: int) -> CountingSample:
    """Resize keeping the aspect ratio so the shorter side is `short` pixels (CARPK evaluation)."""
    s = short / min(sample.height, sample.width)
    return resize(sample, max(1, round(sample.height * s)), max(1, round(sample.width * s)))


def rotate90(sample: CountingSample) -> CountingSample:
    """Rotate a quarter turn counter-clockwise (as seen on screen): (x, y) -> (y, W - x)."""
    width = sample.width
    image = np.rot90(sample.image, k=1, axes=(0, 1))
    return _geometric(sample, image, lambda p: np.stack([p[:, 1], width - p[:, 0]], 1), drops_points=False)


def to_landscape(sample: CountingSample) -> CountingSample:
    """Rotate portrait images to landscape (ShanghaiTech evaluation); landscape ones are unchanged."""
    return rotate90(sample) if sample.height > sample.width else sample


def hflip(sample: CountingSample) -> CountingSample:
    """Mirror left-right: x -> W - x."""
    width = sample.width
    return _geometric(sample, sample.image[:, ::-1], lambda p: np.stack([width - p[:, 0], p[:, 1]], 1),
                      drops_points=False)


def vflip(sample: CountingSample) -> CountingSample:
    """Mirror top-bottom: y -> H - y."""
    height = sample.height
    return _geometric(sample, sample.image[::-1], lambda p: np.stack([p[:, 0], height - p[:, 1]], 1),
                      drops_points=False)


# ---- cropping ---------------------------------------------------------------------------------

def crop(sample: CountingSample, x0: int, y0: int, width: int, height: int) -> CountingSample:
    """The width x height window at (x0, y0); parts beyond the image are zero padding.

    A point is kept when its pixel (see `clipcount.data.sample`) is inside the window, so an
    object on the seam between two adjacent windows is counted in exactly one; kept points are
    shifted by (-x0, -y0).
    """
    out = np.zeros((height, width, 3), dtype=np.float32)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + width, sample.width), min(y0 + height, sample.height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = sample.image[sy0:sy1, sx0:sx1]
    col, row = _pixel_of(sample.points, sample.width, sample.height)
    keep = (col >= x0) & (col < x0 + width) & (row >= y0) & (row < y0 + height)
    shift = np.array([x0, y0], dtype=np.float64)
    return _geometric(sample, out, lambda p: p - shift, drops_points=True, keep=keep)


def _pixel_of(points: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) column and row of the pixel each point belongs to (the right/bottom border counts as
    the last pixel)."""
    col = np.minimum(np.floor(points[:, 0]), width - 1).astype(np.int64)
    row = np.minimum(np.floor(points[:, 1]), height - 1).astype(np.int64)
    return col, row


def random_crop(sample: CountingSample, size: int, rng: np.random.Generator) -> CountingSample:
    """A random size x size window; a side shorter than `size` is zero-padded right/bottom."""
    x0 = int(rng.integers(0, sample.width - size + 1)) if sample.width > size else 0
    y0 = int(rng.integers(0, sample.height - size + 1)) if sample.height > size else 0
    return crop(sample, x0, y0, size, size)


# ---- photometric ------------------------------------------------------------------------------

def add_noise(sample: CountingSample, rng: np.random.Generator, sigma: float = 0.1) -> CountingSample:
    """Additive Gaussian noise of std `sigma`, clipped to [0, 1]."""
    noise = rng.standard_normal(size=sample.image.shape, dtype=np.float32) * np.float32(sigma)
    return _photometric(sample, sample.image + noise)


def gaussian_blur(
    sample: CountingSample, rng: np.random.Generator, sigma: tuple[float, float] = (0.1, 2.0)
) -> CountingSample:
    """Blur each channel with a Gaussian whose sigma is drawn uniformly from `sigma`."""
    s = float(rng.uniform(*sigma))
    blurred = ndimage.gaussian_filter(sample.image, sigma=(s, s, 0), mode="reflect")
    return _photometric(sample, blurred)


def _grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 1) luma (ITU-R 601, as Pillow's "L" conversion)."""
    return (0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2])[..., None]


def _wrap6(x: np.ndarray) -> np.ndarray:
    """x mod 6 for x in [-6, 12) (cheaper than `%`, which dominates the cost otherwise)."""
    x = np.where(x >= 6.0, x - 6.0, x)
    return np.where(x < 0.0, x + 6.0, x)


def _shift_hue(image: np.ndarray, shift: float) -> np.ndarray:
    """Rotate hue by `shift` turns (in [-0.5, 0.5]) via HSV, vectorised in float32."""
    r, g, b = np.moveaxis(image, -1, 0).astype(np.float32)  # contiguous planes: much faster ops
    v = np.maximum(np.maximum(r, g), b)  # faster than image.max(-1) over a size-3 axis
    delta = v - np.minimum(np.minimum(r, g), b)
    s = delta / np.maximum(v, 1e-12)
    safe = np.maximum(delta, 1e-12)
    # hue in sixths of a turn, by which channel is the maximum
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(delta > 0, h, 0.0).astype(np.float32)
    h = _wrap6(_wrap6(h) + np.float32(6.0 * shift))
    # HSV -> RGB: channel n is V - V*S*clip(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, n = 5, 3, 1
    k = _wrap6(np.array([5.0, 3.0, 1.0], dtype=np.float32)[:, None, None] + h)  # (3, H, W)
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return np.moveaxis(v * (1.0 - s * ramp), 0, -1).astype(np.float32)


def colour_jitter(
    sample: CountingSample,
    rng: np.random.Generator,
    brightness: float = 0.3,
    contrast: float = 0.15,
    saturation: float = 0.2,
    hue: float = 0.2,
) -> CountingSample:
    """Random brightness/contrast/saturation factors in [1 - b, 1 + b] and a hue shift in
    [-hue, hue] turns, applied in random order (as torchvision's ColorJitter)."""
    image = sample.image.astype(np.float32)
    for op in rng.permutation(4):
        if op == 0 and brightness > 0:
            image = np.clip(image * rng.uniform(1 - brightness, 1 + brightness), 0, 1)
        elif op == 1 and contrast > 0:
            factor = rng.uniform(1 - contrast, 1 + contrast)
            image = np.clip(_grey(image).mean() + factor * (image - _grey(image).mean()), 0, 1)
        elif op == 2 and saturation > 0:
            factor = rng.uniform(1 - saturation, 1 + saturation)
            grey = _grey(image)
            image = np.clip(grey + factor * (image - grey), 0, 1)
        elif op == 3 and hue > 0:
            image = _shift_hue(image, float(rng.uniform(-hue, hue)))
    return _photometric(sample, image)


# ---- affine -----------------------------------------------------------------------------------

def affine_matrix(
    width: int, height: int, angle_deg: float, scale: float, shear_deg: float, tx: float, ty: float
) -> np.ndarray:
    """(3, 3) forward map, input -> output pixel coordinates: about the image centre, scale, then
    shear along x, then rotate, then translate by (tx, ty) pixels."""
    cx, cy = width / 2.0, height / 2.0
    a, sh = math.radians(angle_deg), math.radians(shear_deg)
    to_origin = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], dtype=np.float64)
    scaling = np.diag([scale, scale, 1.0])
    shearing = np.array([[1, math.tan(sh), 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]], dtype=np.float64)
    return back @ rotation @ shearing @ scaling @ to_origin


def apply_affine(sample: CountingSample, matrix: np.ndarray) -> CountingSample:
    """Warp image and points by the (3, 3) forward `matrix`; same output size, zero fill,
    bilinear. Points that land outside the image are dropped."""
    inverse = np.linalg.inv(matrix)
    coeffs = tuple(float(v) for v in inverse[:2].reshape(-1))  # Pillow maps output -> input
    size = (sample.width, sample.height)
    image = _per_channel(sample.image, lambda im: im.transform(size, Image.AFFINE, coeffs, Image.BILINEAR))

    def fn(p: np.ndarray) -> np.ndarray:
        return p @ matrix[:2, :2].T + matrix[:2, 2]

    return _geometric(sample, np.clip(image, 0, 1), fn, drops_points=True)


def random_affine(
    sample: CountingSample,
    rng: np.random.Generator,
    rotate_deg: float = 15.0,
    scale: tuple[float, float] = (0.8, 1.2),
    shear_deg: float = 10.0,
    translate: float = 0.2,
) -> CountingSample:
    """A random rotation, scale, shear and translation (each drawn uniformly) about the centre."""
    matrix = affine_matrix(
        sample.width,
        sample.height,
        angle_deg=float(rng.uniform(-rotate_deg, rotate_deg)),
        scale=float(rng.uniform(*scale)),
        shear_deg=float(rng.uniform(-shear_deg, shear_deg)),
        tx=float(rng.uniform(-translate, translate)) * sample.width,
        ty=float(rng.uniform(-translate, translate)) * sample.height,
    )
    return apply_affine(sample, matrix)


# ---- mosaic -----------------------------------------------------------------------------------

def mosaic(
    samples: list[CountingSample], size: int, rng: np.random.Generator, min_crop: float = 0.65
) -> CountingSample:
    """A size x size image tiled 2x2 from random square crops of 4 same-prompt samples.

    Each tile is a square of side drawn from [min_crop * size, size] (capped by the image's shorter
    side), resized to the tile; its points come along. Count = points in all four tiles.
    """
    if len(samples) != 4:
        raise ValueError(f"mosaic needs 4 samples, got {len(samples)}")
    prompts = {s.prompt for s in samples}
    if len(prompts) != 1:
        raise ValueError(f"mosaic samples must share one prompt, got {sorted(prompts)}")
    half = size // 2
    spans = [(0, half), (half, size - half)]  # (offset, length) per row/column
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    points, boxes = [], []
    for k, sample in enumerate(samples):
        (oy, th), (ox, tw) = spans[k // 2], spans[k % 2]
        tile = _mosaic_tile(sample, tw, th, size, min_crop, rng)
        canvas[oy:oy + th, ox:ox + tw] = tile.image
        points.append(tile.points + np.array([ox, oy], dtype=np.float32))
        if tile.boxes is not None:
            boxes.append(tile.boxes + np.array([ox, oy, ox, oy], dtype=np.float32))
    return CountingSample(
        image=canvas,
        points=np.concatenate(points, axis=0),
        prompt=samples[0].prompt,
        name="mosaic(" + "+".join(s.name for s in samples) + ")",
        boxes=np.concatenate(boxes, axis=0) if boxes else None,
    )


def _mosaic_tile(
    sample: CountingSample, tw: int, th: int, size: int, min_crop: float, rng: np.random.Generator
) -> CountingSample:
    hi = max(1, min(sample.height, sample.width, size))
    lo = min(hi, max(1, round(min_crop * size)))
    side = int(rng.integers(lo, hi + 1))
    x0 = int(rng.integers(0, sample.width - side + 1)) if sample.width > side else 0
    y0 = int(rng.integers(0, sample.height - side + 1)) if sample.height > side else 0
    return resize(crop(sample, x0, y0, side, side), th, tw)


# ---- the policy -------------------------------------------------------------------------------

def augment(
    sample: CountingSample,
    rng: np.random.Generator,
    cfg: AugmentConfig | None = None,
    extra_samples: Callable[[], CountingSample] | None = None,
) -> CountingSample:
    """The published training policy; returns a crop_size x crop_size sample.

    With probability `mosaic_prob` (when `extra_samples` can supply 3 more samples of the same
    prompt) the result is a mosaic. Otherwise, with probability `augment_prob`: noise, colour
    jitter, blur, random affine and flips; then a random crop_size window.
    """
    cfg = cfg or AugmentConfig()
    if extra_samples is not None and rng.random() < cfg.mosaic_prob:
        group = [sample, *(extra_samples() for _ in range(3))]
        return mosaic(group, cfg.crop_size, rng, cfg.mosaic_min_crop)
    if rng.random() < cfg.augment_prob:
        sample = add_noise(sample, rng, cfg.noise_sigma)
        sample = colour_jitter(sample, rng, *cfg.jitter)
        if rng.random() < cfg.blur_prob:
            sample = gaussian_blur(sample, rng, cfg.blur_sigma)
        sample = random_affine(sample, rng, cfg.rotate_deg, cfg.scale, cfg.shear_deg, cfg.translate)
        if rng.random() < cfg.hflip_prob:
            sample = hflip(sample)
        if rng.random() < cfg.vflip_prob:
            sample = vflip(sample)
    return random_crop(sample, cfg.crop_size, rng)
