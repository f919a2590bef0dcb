"""Drawing the synthetic world: shape outlines, object colours, backgrounds and sensor effects.

Speed matters (scenes are generated on the same two cores that train), so the work is done by
Pillow's C drawing and resizing, and numpy only ever touches whole images a handful of times.

Coordinates follow `clipcount.data.sample`: a point (x, y) is continuous, pixel column c spans
[c, c + 1). Pillow fills a polygon over the pixels its (truncated) vertices span, which matches
that convention up to half a pixel (a quarter with 2x supersampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter


class Drawable(Protocol):
    """What the renderer needs from an object (world.SceneObject has it)."""

    shape: str
    x: float
    y: float
    size: float  # diameter of the circumscribed circle, pixels
    angle: float  # degrees, counter-clockwise on screen
    rgb: tuple[int, int, int]


# ---- shapes -----------------------------------------------------------------------------------

def _regular(n: int, start_deg: float, radius: float = 1.0) -> np.ndarray:
    a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular(points, -90.0)
    inner_pts = _regular(points, -90.0 + 180.0 / points, inner)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)  # alternate outer, inner


def _cross(half_width: float = 0.32) -> np.ndarray:
    w = half_width
    arm = float(np.sqrt(1.0 - w * w))  # arm-end corners lie on the unit circle
    return np.array(
        [(w, -arm), (w, -w), (arm, -w), (arm, w), (w, w), (w, arm),
         (-w, arm), (-w, w), (-arm, w), (-arm, -w), (-w, -w), (-w, -arm)],
        dtype=np.float64,
    )


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float64)
    a.setflags(write=False)
    return a


# Unit templates: every vertex on or inside the unit circle, centroid at the origin (so an object's
# annotated point is its centre and lies inside the drawn shape). Screen y points down.
SHAPE_TEMPLATES: dict[str, np.ndarray] = {
    "circle": _frozen(_regular(28, 0.0)),
    "square": _frozen(_regular(4, 45.0)),
    "triangle": _frozen(_regular(3, -90.0)),
    "star": _frozen(_star()),
    "hexagon": _frozen(_regular(6, 0.0)),
    "cross": _frozen(_cross()),
}


def object_polygons(
    shapes: Sequence[str], xs: np.ndarray, ys: np.ndarray, sizes: np.ndarray, angles: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray]:
    """Vertices and tight boxes of each object, computed per shape in one vectorised step.

    xs, ys, sizes, angles: (N,) -> (list of N arrays (K_shape, 2) in image coordinates,
    (N, 4) boxes x1, y1, x2, y2).
    """
    polygons: list[np.ndarray] = [np.empty((0, 2))] * len(shapes)
    boxes = np.zeros((len(shapes), 4))
    shapes_arr = np.asarray(shapes)
    for shape, template in SHAPE_TEMPLATES.items():
        idx = np.flatnonzero(shapes_arr == shape)
        if len(idx) == 0:
            continue
        a = np.deg2rad(angles[idx])
        cos, sin = np.cos(a)[:, None], np.sin(a)[:, None]  # (n, 1)
        r = 0.5 * sizes[idx][:, None]
        tx, ty = template[None, :, 0], template[None, :, 1]  # (1, K)
        # Counter-clockwise on screen (y down) is clockwise in maths axes.
        vx = xs[idx][:, None] + r * (tx * cos + ty * sin)  # (n, K)
        vy = ys[idx][:, None] + r * (ty * cos - tx * sin)
        boxes[idx] = np.stack([vx.min(1), vy.min(1), vx.max(1), vy.max(1)], axis=1)
        verts = np.stack([vx, vy], axis=2)  # (n, K, 2)
        for j, i in enumerate(idx):
            polygons[i] = verts[j]
    return polygons, boxes


# ---- colours ----------------------------------------------------------------------------------

# Per colour: hue centre and half-range (degrees), saturation range, value range. Neighbouring
# hues (red 0, orange 28, yellow 54) stay >= 12 degrees apart after jitter, so every object still
# reads as its class colour while no class is a single RGB value.
COLOUR_STYLE: dict[str, tuple[float, float, tuple[float, float], tuple[float, float]]] = {
    "red": (0.0, 6.0, (0.75, 1.0), (0.70, 1.0)),
    "orange": (27.0, 5.0, (0.80, 1.0), (0.85, 1.0)),
    "yellow": (54.0, 5.0, (0.75, 1.0), (0.85, 1.0)),
    "green": (125.0, 12.0, (0.60, 1.0), (0.55, 0.95)),
    "blue": (222.0, 10.0, (0.60, 1.0), (0.60, 1.0)),
    "purple": (283.0, 8.0, (0.50, 0.90), (0.55, 0.95)),
}


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) hue in degrees, saturation and value in [0, 1] -> (..., 3) float RGB in [0, 1]."""
    h, s, v = hsv[..., 0] % 360.0, hsv[..., 1], hsv[..., 2]
    k = (np.array([5.0, 3.0, 1.0]) + (h / 60.0)[..., None]) % 6.0  # (..., 3)
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def sample_object_colours(rng: np.random.Generator, colours: Sequence[str]) -> np.ndarray:
    """One jittered RGB per object of the named colours. (N,) names -> (N, 3) uint8."""
    style = np.array(
        [(c, dh, s0, s1, v0, v1) for c, dh, (s0, s1), (v0, v1) in (COLOUR_STYLE[n] for n in colours)],
        dtype=np.float64,
    ).reshape(-1, 6)
    u = rng.random((len(colours), 3))
    hsv = np.stack(
        [
            style[:, 0] + (2.0 * u[:, 0] - 1.0) * style[:, 1],
            style[:, 2] + u[:, 1] * (style[:, 3] - style[:, 2]),
            style[:, 4] + u[:, 2] * (style[:, 5] - style[:, 4]),
        ],
        axis=1,
    )
    return np.round(hsv_to_rgb(hsv) * 255.0).astype(np.uint8)


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """The class colour whose hue is nearest to each pixel. (..., 3) uint8 -> (...,) int index
    into COLOUR_STYLE order. Used by tests to check that what is drawn reads as its label."""
    c = rgb.astype(np.float64) / 255.0
    mx, mn = c.max(-1), c.min(-1)
    d = np.where(mx > mn, mx - mn, 1.0)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    h = np.where(mx == r, (g - b) / d % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    hue = 60.0 * h
    centres = np.array([s[0] for s in COLOUR_STYLE.values()])
    diff = np.abs((hue[..., None] - centres + 180.0) % 360.0 - 180.0)
    return diff.argmin(-1)


# ---- background ------------------------------------------------------------------------------

def _smooth(values: np.ndarray, size: tuple[int, int], offset: float = 0.0) -> Image.Image:
    """A small (h, w) or (h, w, 3) float array (+ offset, clipped to bytes) bilinearly resized to
    `size` = (width, height) by Pillow. (numpy matmul would start BLAS threads that spin on the
    cores training needs.)"""
    small = Image.fromarray(np.clip(np.round(values + offset), 0, 255).astype(np.uint8))
    return small.resize(size, Image.BILINEAR)


def render_background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A varied, object-free background: random muted colour, smooth colour blobs, a gradient and
    sometimes a fine mottled texture, faint stripes or a checkerboard. Returns an RGB image.

    Backgrounds are deliberately less saturated than objects but otherwise random, so neither a
    colour nor a texture tells the model where objects are or how many there are. Everything is
    composed at half resolution and doubled by pixel repetition (Pillow's fastest resize); the
    2-pixel steps are a grey level or two on these smooth fields, below the sensor noise.
    """
    hh, hw = (height + 1) // 2, (width + 1) // 2  # half-resolution canvas
    gh = int(rng.integers(2, 7))
    gw = max(2, int(round(gh * width / height)))
    base = hsv_to_rgb(np.array([rng.uniform(0, 360), rng.uniform(0.0, 0.45), rng.uniform(0.2, 0.95)]))
    yy, xx = np.meshgrid(np.linspace(-1, 1, gh), np.linspace(-1, 1, gw), indexing="ij")  # (gh, gw)
    direction = rng.uniform(0, 2 * np.pi)
    slope = rng.uniform(0.0, 0.25) * (np.cos(direction) * xx + np.sin(direction) * yy)  # (gh, gw)
    blobs = rng.normal(0.0, rng.uniform(0.0, 0.12), (gh, gw, 3))
    image = _smooth(255.0 * (base + slope[..., None] + blobs), (hw, hh))  # (hh, hw) RGB

    luma = None  # (hh, hw) grey-level offsets shared by the three channels
    if rng.random() < 0.5:  # fine mottled texture, cells of 4..24 px
        cell = rng.uniform(2.0, 12.0)  # in half-resolution pixels
        grain = rng.normal(0.0, rng.uniform(3.0, 14.0), (max(2, int(hh / cell)), max(2, int(hw / cell))))
        luma = np.asarray(_smooth(grain, (hw, hh), 128.0), dtype=np.float32) - 128.0
    pattern = rng.random()
    if pattern < 0.2:  # faint stripes at any angle: sin(a x + b y) as a sum of outer products
        period, theta = rng.uniform(6.0, 64.0) / 2, rng.uniform(0, np.pi)
        fx, fy = 2 * np.pi * np.cos(theta) / period, 2 * np.pi * np.sin(theta) / period
        x = np.arange(hw) * fx + rng.uniform(0, 2 * np.pi)
        y = np.arange(hh) * fy
        amp = rng.uniform(3.0, 14.0)
        stripes = np.outer(amp * np.cos(y), np.sin(x)) + np.outer(amp * np.sin(y), np.cos(x))  # (hh, hw)
        luma = stripes if luma is None else luma + stripes
    elif pattern < 0.32:  # faint checkerboard, cells of 8..64 px
        cell = rng.uniform(4.0, 32.0)
        cx = (np.floor((np.arange(hw) + rng.uniform(0, cell)) / cell) % 2) * 2 - 1
        cy = (np.floor((np.arange(hh) + rng.uniform(0, cell)) / cell) % 2) * 2 - 1
        checker = np.outer(rng.uniform(3.0, 12.0) * cy, cx)  # (hh, hw)
        luma = checker if luma is None else luma + checker
    if luma is not None:
        lum = Image.fromarray(np.clip(luma + 128.0, 0, 255).astype(np.uint8))
        image = ImageChops.add(image, Image.merge("RGB", (lum, lum, lum)), 1.0, -128)
    # Pixel doubling; the box keeps exactly width x height when either is odd.
    return image.resize((width, height), Image.NEAREST, box=(0, 0, width / 2, height / 2))


# ---- objects and sensor effects -----------------------------------------------------------------

def draw_objects(
    image: Image.Image,
    polygons: Sequence[np.ndarray],
    colours: np.ndarray,
    antialias: bool = False,
    inner: Sequence[np.ndarray] | None = None,
) -> Image.Image:
    """Fill each polygon (in order: later ones on top) with its colour. Draws into `image` itself
    (saving a copy) unless `antialias`, which returns a new image.

    polygons: N arrays (K, 2) in image coordinates; colours: (N, 3) uint8. With `inner` (N
    shrunken copies of the polygons) each shape gets a dark rim: the polygon is filled dark and
    the inner copy with the colour (a real stroke in Pillow allocates a full-image mask per
    polygon, 20x slower). With `antialias` the shapes are drawn at twice the resolution and
    box-filtered down (2-3 ms more for a 384x576 image).
    """
    scale = 2 if antialias else 1
    canvas = image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image
    draw = ImageDraw.Draw(canvas)
    for i, rgb in enumerate(colours.tolist()):
        if inner is not None:
            dark = (rgb[0] * 9 // 16, rgb[1] * 9 // 16, rgb[2] * 9 // 16)  # same hue, darker
            draw.polygon((polygons[i] * scale).ravel().tolist(), fill=dark)
            draw.polygon((inner[i] * scale).ravel().tolist(), fill=tuple(rgb))
        else:
            draw.polygon((polygons[i] * scale).ravel().tolist(), fill=tuple(rgb))
    return canvas.reduce(scale) if scale > 1 else canvas


def degrade(image: Image.Image, rng: np.random.Generator, blur: float, noise: int) -> np.ndarray:
    """Camera-like blur (box filter of `blur` pixels, 0 = none) and uniform per-pixel luminance
    noise of +-`noise` grey levels. Returns (H, W, 3) uint8."""
    if blur > 0:
        image = image.filter(ImageFilter.BoxBlur(blur))
    if noise > 0:
        raw = Image.frombytes("L", image.size, rng.bytes(image.width * image.height))
        # Map bytes 0..255 uniformly onto 128 - noise .. 128 + noise with a lookup table.
        n = raw.point([128 - noise + (v * (2 * noise + 1) >> 8) for v in range(256)])
        image = ImageChops.add(image, Image.merge("RGB", (n, n, n)), 1.0, -128)
    return np.array(image, dtype=np.uint8)


def render_objects_alone(
    height: int, width: int, objects: Sequence[Drawable], antialias: bool = False
) -> np.ndarray:
    """Objects on a black background with no effects, (H, W, 3) uint8; for tests and debugging."""
    polygons, _ = object_polygons(
        [o.shape for o in objects],
        np.array([o.x for o in objects], dtype=np.float64),
        np.array([o.y for o in objects], dtype=np.float64),
        np.array([o.size for o in objects], dtype=np.float64),
        np.array([o.angle for o in objects], dtype=np.float64),
    )
    colours = np.array([o.rgb for o in objects], dtype=np.uint8).reshape(-1, 3)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    return np.array(draw_objects(canvas, polygons, colours, antialias=antialias), dtype=np.uint8)
