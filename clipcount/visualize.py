"""Pictures of a count: the density as a heat map over the image, the object points, a caption.

No matplotlib: the colormap is a handful of colour stops interpolated here. The heat map is
blended with an opacity that grows with density, so the photo stays visible where nothing was
found and the eye goes to where the mass is.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colour stops (position in [0, 1], RGB in [0, 1]): dark violet -> red -> orange -> pale yellow.
# Monotonically brightening, so higher density always reads as brighter, also in greyscale.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([
    [0.05, 0.02, 0.20],
    [0.45, 0.05, 0.50],
    [0.85, 0.20, 0.25],
    [0.98, 0.60, 0.10],
    [1.00, 0.98, 0.65],
])
_MAX_OPACITY = 0.7
_PERCENTILE = 99.5  # normalise by a high percentile, not the maximum: one hot pixel should not wash out the rest


def colormap(values: np.ndarray) -> np.ndarray:
    """Values (H, W) in [0, 1] -> colours (H, W, 3) float32 in [0, 1]."""
    clipped = np.clip(np.nan_to_num(values), 0.0, 1.0)
    channels = [np.interp(clipped, _STOPS, _COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.float32)


def normalise_density(density: np.ndarray) -> np.ndarray:
    """Density (H, W) -> (H, W) in [0, 1], 1 at the high end of the positive values."""
    positive = np.clip(np.nan_to_num(np.asarray(density, dtype=np.float32)), 0.0, None)
    nonzero = positive[positive > 0]
    if nonzero.size == 0:
        return np.zeros_like(positive)
    top = float(np.percentile(nonzero, _PERCENTILE))
    return np.clip(positive / max(top, 1e-12), 0.0, 1.0)


def heat_blend(image: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Image (H, W, 3) float in [0, 1] + density (H, W) -> blended (H, W, 3) float32 in [0, 1]."""
    if image.shape[:2] != density.shape:
        raise ValueError(f"density {density.shape} must match the image's size {image.shape[:2]}")
    level = normalise_density(density)  # (H, W)
    alpha = (_MAX_OPACITY * np.sqrt(level))[..., None]  # (H, W, 1): faint mass still shows
    dimmed = image.astype(np.float32) * 0.85  # a slightly darker photo lets the colours stand out
    return np.clip(dimmed * (1.0 - alpha) + colormap(level) * alpha, 0.0, 1.0)


def overlay(image: np.ndarray, density: np.ndarray, points: np.ndarray, count: float, prompt: str) -> Image.Image:
    """The picture of one count: heat map, points as small circles, caption "prompt: count".

    image (H, W, 3) float in [0, 1]; density (H, W) at the image's size; points (K, 2) as (x, y) in
    image pixels. Returns an RGB PIL image of the image's size plus a caption bar on top.
    """
    blended = heat_blend(image, density)
    picture = Image.fromarray(np.round(blended * 255.0).astype(np.uint8), mode="RGB")
    _draw_points(picture, points)
    return _with_caption(picture, f"{prompt}: {format_count(count)}")


def format_count(count: float) -> str:
    """A count as people read it: one decimal, since densities give fractional counts."""
    if not math.isfinite(count):
        return "?"
    return f"{count:.1f}"


def _draw_points(picture: Image.Image, points: np.ndarray) -> None:
    """Small circles, white with a dark rim so they show on light and dark areas alike."""
    radius = max(2.0, min(picture.size) / 150.0)
    draw = ImageDraw.Draw(picture)
    for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        box = (x - radius, y - radius, x + radius, y + radius)
        draw.ellipse(box, fill=(255, 255, 255), outline=(20, 20, 20), width=max(1, round(radius / 3)))


def _with_caption(picture: Image.Image, text: str) -> Image.Image:
    """The picture with a dark bar above it holding `text`, sized to the picture's width."""
    size = int(np.clip(picture.width / 24, 12, 40))
    font = _font(size)
    bar = round(size * 1.6)
    canvas = Image.new("RGB", (picture.width, picture.height + bar), (24, 24, 28))
    canvas.paste(picture, (0, bar))
    draw = ImageDraw.Draw(canvas)
    draw.text((max(4, size // 2), bar // 2), _fit(draw, text, font, picture.width - size), fill=(255, 255, 255),
              font=font, anchor="lm")
    return canvas


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled font, scalable with FreeType
    except (TypeError, ValueError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten a long prompt with an ellipsis so the caption fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    prompt, _, count = text.rpartition(": ")
    while prompt and draw.textlength(f"{prompt}…: {count}", font=font) > width:
        prompt = prompt[:-1]
    return f"{prompt}…: {count}"
