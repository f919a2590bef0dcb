"""Pictures of a count: the density as a heat map over the image, the object points, a caption.

No matplotlib: the colormap is a handful of colour stops interpolated here. The photo is dimmed and
half desaturated so the heat colours stand out on any photo while its own colours stay readable
("red cars" must still look red); the heat map is blended with an opacity that grows with density,
so empty areas show the photo and the eye goes to where the mass is. Points are cyan discs with a
black ring and a white halo: cyan is in no colour of the heat map, and the ring and halo keep the
disc visible on white, black and saturated areas alike. The caption bar carries a small legend.
The web page (clipcount/web.py) uses the same pictures and draws the same legend in HTML.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colour stops (position in [0, 1], RGB in [0, 1]): violet -> magenta -> orange -> yellow -> pale yellow.
# Saturated from the lowest level up (a faint tint is hard to see) and monotonically brightening, so
# higher density always reads as brighter, also in greyscale.
_STOPS = np.array([0.0, 0.3, 0.55, 0.8, 1.0])
_COLOURS = np.array([
    [0.32, 0.08, 0.62],
    [0.78, 0.10, 0.55],
    [0.97, 0.40, 0.12],
    [1.00, 0.80, 0.10],
    [1.00, 1.00, 0.70],
])
_MAX_OPACITY = 0.9
_MIN_LEVEL = 0.12  # below this share of the top density nothing is tinted: a faint floor stays clean
_PERCENTILE = 99.5  # normalise by a high percentile, not the maximum: one hot pixel should not wash out the rest
_PHOTO_BRIGHTNESS = 0.7  # the photo is dimmed to this ...
_PHOTO_SATURATION = 0.5  # ... and keeps this much of its colour
POINT_FILL = (0, 229, 255)  # cyan: not a colour of the heat map
POINT_RING = (0, 0, 0)
POINT_HALO = (255, 255, 255)


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
    visible = np.clip((level - _MIN_LEVEL) / (1.0 - _MIN_LEVEL), 0.0, 1.0)
    alpha = (_MAX_OPACITY * visible ** 0.6)[..., None]  # (H, W, 1): weak mass still shows
    photo = image.astype(np.float32)
    grey = photo @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
    muted = _PHOTO_BRIGHTNESS * (_PHOTO_SATURATION * photo + (1.0 - _PHOTO_SATURATION) * grey[..., None])
    return np.clip(muted * (1.0 - alpha) + colormap(level) * alpha, 0.0, 1.0)


def overlay(image: np.ndarray, density: np.ndarray, points: np.ndarray, count: float, prompt: str,
            caption: bool = True) -> Image.Image:
    """The picture of one count: heat map, points as discs, caption "prompt: count" with a legend.

    image (H, W, 3) float in [0, 1]; density (H, W) at the image's size; points (K, 2) as (x, y) in
    image pixels. Returns an RGB PIL image of the image's size plus (caption=True) a caption bar on
    top; the web page shows the count and legend itself and asks for the bare picture.
    """
    blended = heat_blend(image, density)
    picture = Image.fromarray(np.round(blended * 255.0).astype(np.uint8), mode="RGB")
    _draw_points(picture, points)
    return _with_caption(picture, f"{prompt}: {format_count(count)}") if caption else picture


def point_radius(width: int, height: int) -> float:
    """Disc radius in pixels, from the longest side: a picture shrunk to fit a page keeps visible discs."""
    return max(3.0, max(width, height) / 120.0)


def legend_colours(steps: int = 8) -> list[str]:
    """The heat map's colours from low to high as CSS hex strings (for a legend drawn elsewhere)."""
    colours = np.round(colormap(np.linspace(0.0, 1.0, steps)[None])[0] * 255).astype(int)
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colours]


def format_count(count: float) -> str:
    """A count as people read it: one decimal, since densities give fractional counts."""
    if not math.isfinite(count):
        return "?"
    return f"{count:.1f}"


def _draw_points(picture: Image.Image, points: np.ndarray) -> None:
    """Cyan discs with a black ring inside a thin white halo (module notes: why these colours)."""
    radius = point_radius(*picture.size)
    draw = ImageDraw.Draw(picture)
    for x, y in np.asarray(points, dtype=np.float64).reshape(-1, 2):
        _draw_marker(draw, x, y, radius)


def _draw_marker(draw: ImageDraw.ImageDraw, x: float, y: float, radius: float) -> None:
    halo = radius + max(1.0, radius / 4)
    draw.ellipse((x - halo, y - halo, x + halo, y + halo), fill=POINT_HALO)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=POINT_FILL, outline=POINT_RING,
                 width=max(1, round(radius / 2.5)))


def _with_caption(picture: Image.Image, text: str) -> Image.Image:
    """The picture with a dark bar above it holding `text` and, where it fits, the legend."""
    size = int(np.clip(picture.width / 24, 12, 40))
    font = _font(size)
    bar = round(size * 1.6)
    canvas = Image.new("RGB", (picture.width, picture.height + bar), (24, 24, 28))
    canvas.paste(picture, (0, bar))
    draw = ImageDraw.Draw(canvas)
    legend = _draw_legend(draw, canvas.width, bar) if picture.width >= 320 else 0
    draw.text((max(4, size // 2), bar // 2), _fit(draw, text, font, picture.width - size - legend),
              fill=(255, 255, 255), font=font, anchor="lm")
    return canvas


def _draw_legend(draw: ImageDraw.ImageDraw, width: int, bar: int) -> int:
    """"object ●  low [colour ramp] high" at the right end of the caption bar; returns its width."""
    size = max(10, round(bar * 0.4))
    font = _font(size)
    ramp = max(40, width // 8)
    margin = size // 2
    right = width - margin
    high_width = draw.textlength("high", font=font)
    low_width = draw.textlength("low", font=font)
    ramp_right = right - high_width - margin // 2
    ramp_left = ramp_right - ramp
    top, bottom = bar * 0.3, bar * 0.7
    for i in range(ramp):
        colour = tuple(int(v) for v in np.round(colormap(np.array([[i / max(1, ramp - 1)]]))[0, 0] * 255))
        draw.line([(ramp_left + i, top), (ramp_left + i, bottom)], fill=colour)
    draw.text((right, bar / 2), "high", fill=(230, 230, 230), font=font, anchor="rm")
    draw.text((ramp_left - margin // 2, bar / 2), "low", fill=(230, 230, 230), font=font, anchor="rm")
    marker_x = ramp_left - margin - low_width - size
    _draw_marker(draw, marker_x, bar / 2, size / 2.5)
    object_right = marker_x - size / 2.5 - margin // 2
    draw.text((object_right, bar / 2), "object", fill=(230, 230, 230), font=font, anchor="rm")
    return int(width - object_right + draw.textlength("object", font=font) + margin)


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
