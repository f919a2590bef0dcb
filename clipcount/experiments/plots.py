"""Plots for the experiment reports, drawn with Pillow alone (no plotting library to install).

Three kinds, enough for every report: `xy_chart` (lines and/or labelled points, linear or log x),
`bar_chart` (grouped bars over categories) and `map_grid` (images and heat maps side by side).
Each writes one PNG and returns its path. The charts are plain on purpose: axes with a handful of
ticks, a legend, a title; NaN values are skipped, not drawn as zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colour-blind-safe palette (Okabe-Ito), then greys.
PALETTE = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
           (240, 228, 66), (0, 0, 0), (120, 120, 120))
WIDTH, HEIGHT = 720, 440
MARGIN = dict(left=70, right=190, top=50, bottom=60)  # the right margin holds the legend


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    value = math.floor(low / step) * step
    ticks = [round(value, 10)]
    while ticks[-1] < high - 1e-12 * max(1.0, abs(high)):  # the last tick reaches the highest value
        value += step
        ticks.append(round(value, 10))
    return ticks


def _format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


class _Axes:
    """Maps data coordinates to pixels inside the plot area."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], log_x: bool, y_from_zero: bool):
        self.log_x = log_x
        fx = [self._tx(x) for x in xs if _finite(x) and (x > 0 or not log_x)]
        fy = [y for y in ys if _finite(y)]
        self.x0, self.x1 = (min(fx), max(fx)) if fx else (0.0, 1.0)
        if self.x0 == self.x1:
            self.x0, self.x1 = self.x0 - 0.5, self.x1 + 0.5
        pad = 0.04 * (self.x1 - self.x0)
        self.x0, self.x1 = self.x0 - pad, self.x1 + pad
        low, high = (min(fy), max(fy)) if fy else (0.0, 1.0)
        if y_from_zero:
            low = min(0.0, low)
        self.yticks = nice_ticks(low, high)
        self.y0, self.y1 = self.yticks[0], self.yticks[-1]
        self.left, self.top = MARGIN["left"], MARGIN["top"]
        self.right, self.bottom = WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]

    def _tx(self, x: float) -> float:
        return math.log10(x) if self.log_x else float(x)

    def px(self, x: float) -> float:
        return self.left + (self._tx(x) - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def xticks(self) -> list[float]:
        if self.log_x:  # powers of ten; 1-2-5 steps when the range spans less than a few decades
            decades = range(math.floor(self.x0), math.ceil(self.x1) + 1)
            inside = [m * 10.0**e for e in decades for m in (1, 2, 5) if self.x0 <= math.log10(m * 10.0**e) <= self.x1]
            powers = [t for t in inside if math.log10(t).is_integer()]
            return powers if len(powers) >= 3 else inside or [10.0 ** ((self.x0 + self.x1) / 2)]
        return [t for t in nice_ticks(self.x0, self.x1) if self.x0 <= t <= self.x1]


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)


def _frame(draw: ImageDraw.ImageDraw, axes: _Axes, title: str, xlabel: str, ylabel: str,
           xticks: Sequence[tuple[float, str]], font) -> None:
    """Title, axis box, grid lines, tick labels and axis labels."""
    draw.text((axes.left, 8), title, fill=(0, 0, 0), font=font)
    for y in axes.yticks:
        py = axes.py(y)
        draw.line([(axes.left, py), (axes.right, py)], fill=(225, 225, 225))
        label = _format_tick(y)
        w, h = _text_size(draw, label, font)
        draw.text((axes.left - w - 6, py - h / 2 - 2), label, fill=(60, 60, 60), font=font)
    for px, label in xticks:
        draw.line([(px, axes.bottom), (px, axes.bottom + 4)], fill=(0, 0, 0))
        w, _ = _text_size(draw, label, font)
        draw.text((px - w / 2, axes.bottom + 7), label, fill=(60, 60, 60), font=font)
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline=(0, 0, 0))
    w, _ = _text_size(draw, xlabel, font)
    draw.text(((axes.left + axes.right - w) / 2, HEIGHT - 26), xlabel, fill=(0, 0, 0), font=font)
    draw.text((8, axes.top - 18), ylabel, fill=(0, 0, 0), font=font)


def _legend(draw: ImageDraw.ImageDraw, labels: Sequence[str], font) -> None:
    x, y = WIDTH - MARGIN["right"] + 12, MARGIN["top"]
    for i, label in enumerate(labels):
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle([x, y + 3, x + 12, y + 13], fill=colour)
        draw.text((x + 18, y), label[:24], fill=(0, 0, 0), font=font)
        y += 20


def xy_chart(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    lines: bool = True,
    point_labels: Mapping[str, Sequence[str]] | None = None,
    y_from_zero: bool = True,
) -> Path:
    """One line (or point set) per series: label -> (xs, ys). `point_labels` names single points."""
    xs = [x for pts in series.values() for x in pts[0]]
    ys = [y for pts in series.values() for y in pts[1]]
    axes = _Axes(xs, ys, log_x, y_from_zero)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    ticks = [(axes.px(t), _format_tick(t)) for t in axes.xticks()]
    _frame(draw, axes, title, xlabel, ylabel, ticks, font)
    for i, (label, (sx, sy)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        points = [(axes.px(x), axes.py(y)) for x, y in zip(sx, sy)
                  if _finite(x) and _finite(y) and (x > 0 or not log_x)]
        if lines and len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour, outline=(0, 0, 0))
        names = (point_labels or {}).get(label)
        if names:
            kept = [n for n, x, y in zip(names, sx, sy) if _finite(x) and _finite(y) and (x > 0 or not log_x)]
            for name, (px, py) in zip(kept, points):
                draw.text((px + 6, py - 16), str(name), fill=colour, font=font)
    _legend(draw, list(series), font)
    return _save(image, path)


def bar_chart(
    path: str | Path,
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str,
) -> Path:
    """Grouped bars: one group per category, one bar per series (label -> value per category)."""
    values = [v for vs in series.values() for v in vs]
    axes = _Axes([0, max(1, len(categories))], values, False, True)
    axes.x0, axes.x1 = 0.0, float(len(categories))
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    group = (axes.right - axes.left) / max(1, len(categories))
    ticks = [(axes.left + group * (i + 0.5), str(c)[:16]) for i, c in enumerate(categories)]
    _frame(draw, axes, title, "", ylabel, ticks, font)
    n = max(1, len(series))
    bar = group * 0.8 / n
    for j, (label, vals) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        for i, value in enumerate(vals):
            if not _finite(value):
                continue
            x = axes.left + group * i + group * 0.1 + bar * j
            y0, y1 = sorted((axes.py(0.0), axes.py(value)))
            draw.rectangle([x, y0, x + bar - 2, y1], fill=colour)
    _legend(draw, list(series), font)
    return _save(image, path)


def heat_colours(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """A 2-D array -> (H, W, 3) uint8 on a dark-blue -> yellow ramp, scaled to [low, high]."""
    values = np.asarray(values, dtype=np.float64)
    low = float(np.nanmin(values)) if low is None else low
    high = float(np.nanmax(values)) if high is None else high
    t = np.clip((values - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    t = np.nan_to_num(t)
    stops = np.array([[20, 20, 80], [40, 90, 170], [40, 170, 130], [240, 220, 50]], dtype=np.float64)
    position = t * (len(stops) - 1)
    index = np.minimum(position.astype(int), len(stops) - 2)
    frac = (position - index)[..., None]
    return (stops[index] * (1 - frac) + stops[index + 1] * frac).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """An (h, w) heat map drawn over an (H, W, 3) uint8 image (nearest-neighbour upscaling, so a
    patch grid stays visible) -> (H, W, 3) uint8."""
    height, width = image.shape[:2]
    colours = Image.fromarray(heat_colours(heat)).resize((width, height), Image.Resampling.NEAREST)
    blended = (1 - alpha) * image.astype(np.float64) + alpha * np.asarray(colours, dtype=np.float64)
    return blended.clip(0, 255).astype(np.uint8)


def map_grid(
    path: str | Path,
    rows: Sequence[Sequence[tuple[str, np.ndarray]]],
    title: str,
    cell: int = 160,
) -> Path:
    """A grid of titled cells; each cell is an (H, W, 3) uint8 image or an (h, w) heat map
    (scaled to its own range, nearest-neighbour so patch grids stay visible); use `overlay` to
    draw a map over its image."""
    font = _font()
    columns = max(len(r) for r in rows) if rows else 1
    header, caption = 30, 18
    image = Image.new("RGB", (columns * (cell + 8) + 8, header + len(rows) * (cell + caption + 8)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 8), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, (name, array) in enumerate(row):
            array = np.asarray(array)
            if array.ndim == 2:
                tile = Image.fromarray(heat_colours(array)).resize((cell, cell), Image.Resampling.NEAREST)
            else:
                tile = Image.fromarray(array.astype(np.uint8)).resize((cell, cell), Image.Resampling.BILINEAR)
            x, y = 8 + c * (cell + 8), header + r * (cell + caption + 8)
            draw.text((x, y), name[:26], fill=(0, 0, 0), font=font)
            image.paste(tile, (x, y + caption))
    return _save(image, path)


def _save(image: Image.Image, path: str | Path) -> Path:
    from clipcount.imaging import save_image_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomic(image, path)
    return path
