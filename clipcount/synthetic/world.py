"""Seeded synthetic counting scenes: coloured shapes on varied backgrounds, every object annotated.

A scene is made in three steps: choose classes and counts, place objects (sizes first, then
positions with bounded overlap), render. Only objects that were placed are drawn and annotated, so
annotations and pixels always agree. All randomness comes from the `numpy.random.Generator` (or
integer seed) passed in.

Overlap rule: two objects with circumradii r_i >= r_j may overlap, but their centres are at least
r_i + separation * r_j apart. So no object's centre is covered by another object, the smaller one
always shows at least part of itself beyond the larger one's outline, and the annotated point of
every object shows that object's own colour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from clipcount.errors import ConfigError
from clipcount.synthetic.prompts import (
    ALL_CLASSES,
    COLOURS,
    HELD_OUT,
    SHAPES,
    TRAIN_CLASSES,
    count_for_prompt,
    format_prompt,
    sample_prompt,
)
from clipcount.synthetic.render import degrade, draw_objects, object_polygons, render_background, sample_object_colours

Class = tuple[str, str]  # (colour, shape)
TEST_KINDS = ("held_out", "fidelity", "seen")

# Random sequential placement of disks jams at ~55% coverage; asking for at most 30% coverage by
# the exclusion disks keeps placement quick and culling rare. Sizes shrink to fit this budget.
_PACKING = 0.30
_CANDIDATES = 16  # positions tried per batch ...
_BATCHES = 4  # ... and batches before an object is dropped (neither drawn nor annotated)
_EDGE = 1.0  # pixels kept free between an object's circumcircle and the image border
_SLACK = 1.5  # placement errs on the safe side by up to this many pixels (look-up table error)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. Coordinates are continuous pixels (column c spans [c, c + 1))."""

    shape: str
    colour: str
    x: float  # centre = annotated point
    y: float
    size: float  # diameter of the circumscribed circle, pixels
    angle: float  # rotation, degrees counter-clockwise
    box: tuple[float, float, float, float]  # tight x1, y1, x2, y2 of the drawn polygon
    rgb: tuple[int, int, int]  # the jittered fill colour


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject]  # in drawing order, bottom first

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    def select(self, colour: str | None = None, shape: str | None = None) -> list[SceneObject]:
        """Objects of a colour and/or shape (None = any)."""
        return [
            o for o in self.objects
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)
        ]

    def points(self, colour: str | None = None, shape: str | None = None) -> np.ndarray:
        """Centres of the selected objects, (N, 2) float32 (x, y)."""
        sel = self.select(colour, shape)
        return np.array([(o.x, o.y) for o in sel], dtype=np.float32).reshape(-1, 2)

    def boxes(self, colour: str | None = None, shape: str | None = None) -> np.ndarray:
        """Tight boxes of the selected objects, (N, 4) float32 x1, y1, x2, y2."""
        sel = self.select(colour, shape)
        return np.array([o.box for o in sel], dtype=np.float32).reshape(-1, 4)

    def count(self, prompt: str) -> int:
        """Number of objects the prompt refers to ("red stars" or "stars", singular or plural)."""
        return count_for_prompt(self, prompt)

    def class_counts(self) -> dict[Class, int]:
        counts: dict[Class, int] = {}
        for o in self.objects:
            counts[(o.colour, o.shape)] = counts.get((o.colour, o.shape), 0) + 1
        return counts


@dataclass
class WorldConfig:
    height: int = 384
    min_width: int = 384
    max_width: int = 1024
    min_size: float = 8.0  # object diameters (circumscribed circle), pixels
    max_size: float = 60.0
    max_per_class: int = 250
    classes_per_scene: tuple[int, int] = (1, 4)  # inclusive range of distinct classes
    mode: Literal["train", "test"] = "train"  # "train" never draws a held-out class
    separation: float = 0.35  # overlap bound, see the module docstring (0 = centres just uncovered)
    confuser_prob: float = 0.5  # chance that each extra class shares a colour or shape with the first
    antialias: bool = False  # 2x supersampled edges: smoother, 2-3 ms more per 384x576 scene
    effects: bool = True  # random blur, sensor noise and dark outlines
    # Chance that `sample_training_example` prompts a class absent from the scene (count 0).
    # Off by default: a loss that needs positive pixels (the contrastive loss) is undefined there.
    absent_prompt_prob: float = 0.0

    def __post_init__(self) -> None:
        self.classes_per_scene = tuple(int(v) for v in self.classes_per_scene)  # JSON gives lists
        problems = []
        if self.mode not in ("train", "test"):
            problems.append(f"mode must be 'train' or 'test', got {self.mode!r}")
        if not 0 < self.min_size <= self.max_size:
            problems.append(f"need 0 < min_size <= max_size, got {self.min_size}, {self.max_size}")
        if self.min_size < 4:
            problems.append(f"min_size {self.min_size} is too small to draw a recognisable shape (>= 4)")
        if not 0 < self.min_width <= self.max_width:
            problems.append(f"need 0 < min_width <= max_width, got {self.min_width}, {self.max_width}")
        if self.max_size + 2 * _EDGE > min(self.height, self.min_width):
            problems.append(
                f"max_size {self.max_size} does not fit in a {self.height}x{self.min_width} image"
            )
        lo, hi = self.classes_per_scene if len(self.classes_per_scene) == 2 else (0, -1)
        if not 1 <= lo <= hi <= len(TRAIN_CLASSES):
            problems.append(
                f"classes_per_scene must be (lo, hi) with 1 <= lo <= hi <= {len(TRAIN_CLASSES)}, "
                f"got {self.classes_per_scene}"
            )
        if self.max_per_class < 1:
            problems.append(f"max_per_class must be >= 1, got {self.max_per_class}")
        if self.separation < 0:
            problems.append(f"separation must be >= 0, got {self.separation}")
        for name in ("confuser_prob", "absent_prompt_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if problems:
            raise ConfigError("invalid synthetic WorldConfig: " + "; ".join(problems))

    @property
    def classes(self) -> tuple[Class, ...]:
        """Classes this config may draw: training classes only in "train" mode, all in "test"."""
        return TRAIN_CLASSES if self.mode == "train" else ALL_CLASSES

    def replace(self, **changes: object) -> "WorldConfig":
        return dataclasses.replace(self, **changes)


# ---- random choices ---------------------------------------------------------------------------

def as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    """A Generator from a Generator or an integer seed (never the global numpy state)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ConfigError(f"pass a numpy.random.Generator or an integer seed, got {type(rng).__name__}")


def sample_count(rng: np.random.Generator, low: int, high: int) -> int:
    """Log-uniform integer in [low, high]: dense and sparse classes are both common."""
    low = max(1, low)
    return int(min(high, np.floor(np.exp(rng.uniform(np.log(low), np.log(high + 1))))))


def _pick(rng: np.random.Generator, options: list[Class]) -> Class:
    return options[int(rng.integers(len(options)))]


def sample_classes(
    rng: np.random.Generator, cfg: WorldConfig, first: Class | None = None, k: int | None = None
) -> list[Class]:
    """k distinct classes allowed by cfg.mode (k default: random in cfg.classes_per_scene),
    starting with `first`. Each extra class shares the first's colour or shape with probability
    cfg.confuser_prob, so prompts can only be answered by reading both words."""
    pool = cfg.classes
    if k is None:
        lo, hi = cfg.classes_per_scene
        k = int(rng.integers(lo, hi + 1))
    chosen = [first if first is not None else _pick(rng, list(pool))]
    while len(chosen) < min(k, len(pool)):
        rest = [c for c in pool if c not in chosen]
        similar = [c for c in rest if c[0] == chosen[0][0] or c[1] == chosen[0][1]]
        options = similar if similar and rng.random() < cfg.confuser_prob else rest
        chosen.append(_pick(rng, options))
    return chosen


# ---- placement --------------------------------------------------------------------------------

def _object_sizes(rng: np.random.Generator, cfg: WorldConfig, counts: list[int], area: float) -> np.ndarray:
    """Diameters, (sum(counts),): one log-uniform base size per class with +-15% jitter, all
    shrunk together (down to min_size) when the scene would be too crowded to place."""
    base = np.exp(rng.uniform(np.log(cfg.min_size), np.log(cfg.max_size), len(counts)))
    sizes = np.repeat(base, counts) * rng.uniform(0.85, 1.15, int(sum(counts)))
    sizes = np.clip(sizes, cfg.min_size, cfg.max_size)
    # Exclusion disks have diameter about (1 + s) r + _SLACK; their total area must stay under
    # _PACKING * area. With r scaled by t that is a t^2 + b t + c <= budget.
    grow = 1.0 + cfg.separation
    r = sizes / 2.0
    a = grow**2 * float(np.sum(r**2))
    b = 2.0 * grow * _SLACK * float(np.sum(r))
    c = _SLACK**2 * len(r)
    budget = 4.0 * _PACKING * area / np.pi
    if a + b + c > budget:
        t = (-b + np.sqrt(max(b * b - 4.0 * a * (c - budget), 0.0))) / (2.0 * a)
        sizes = np.maximum(sizes * max(t, 0.0), cfg.min_size)
    return sizes


def _place(
    rng: np.random.Generator, radii: np.ndarray, height: int, width: int, separation: float
) -> tuple[np.ndarray, np.ndarray]:
    """Random sequential placement, largest first. radii (N,) -> centres (N, 2) and placed (N,) bool.

    `clearance[row, col]` is a lower bound of min_j(distance from the pixel to centre j - r_j)
    over placed objects. Placing largest first means every placed j has r_j >= r_i, so the
    overlap rule for a new object i is clearance(c_i) >= separation * r_i: one table look-up per
    candidate position, however many objects are placed. Stamping uses one precomputed table of
    distances from a pixel centre, so the bound is conservative by up to 1.5 px. The loop body is
    a handful of numpy calls (the first batch of candidates is drawn for all objects at once).
    """
    n = len(radii)
    centres = np.zeros((n, 2), dtype=np.float64)
    placed = np.zeros(n, dtype=bool)
    if n == 0:
        return centres, placed
    slack = _SLACK
    order = np.argsort(-radii, kind="stable")
    r_sorted = radii[order]
    reach = int(np.ceil((1.0 + separation) * float(r_sorted[0]) + 2 * slack)) + 1
    offsets = np.arange(-reach, reach + 1, dtype=np.float32)
    disk = np.sqrt(offsets[:, None] ** 2 + offsets[None, :] ** 2) - slack  # (2R+1, 2R+1)
    clearance = np.full((height, width), np.inf, dtype=np.float32)

    lo = r_sorted + _EDGE  # (n,) lowest allowed centre coordinate
    span_x, span_y = width - 2 * lo, height - 2 * lo  # (n,)
    u = rng.random((n, 2, _CANDIDATES))
    cand_x = lo[:, None] + u[:, 0] * np.maximum(span_x, 0)[:, None]  # (n, C)
    cand_y = lo[:, None] + u[:, 1] * np.maximum(span_y, 0)[:, None]
    col, row = cand_x.astype(np.intp), cand_y.astype(np.intp)
    need = (separation * r_sorted + slack).astype(np.float32)  # (n,)
    r32 = r_sorted.astype(np.float32)
    limit = np.minimum(reach, ((1.0 + separation) * r_sorted + 2 * slack).astype(np.intp) + 1)

    for k, i in enumerate(order.tolist()):
        if span_x[k] < 0 or span_y[k] < 0:
            continue
        ok = clearance[row[k], col[k]] >= need[k]
        j = int(ok.argmax())
        if ok[j]:
            x, y = float(cand_x[k, j]), float(cand_y[k, j])
        else:  # rare: more batches, drawn from the same stream
            found = None
            for _ in range(_BATCHES - 1):
                cx = lo[k] + rng.random(_CANDIDATES) * span_x[k]
                cy = lo[k] + rng.random(_CANDIDATES) * span_y[k]
                ok = clearance[cy.astype(np.intp), cx.astype(np.intp)] >= need[k]
                j = int(ok.argmax())
                if ok[j]:
                    found = float(cx[j]), float(cy[j])
                    break
            if found is None:
                continue
            x, y = found
        centres[i] = (x, y)
        placed[i] = True
        # Later objects are no larger, so clearance beyond (1 + separation) r never matters.
        m, px, py = int(limit[k]), int(x), int(y)
        x0, x1, y0, y1 = max(0, px - m), min(width, px + m + 1), max(0, py - m), min(height, py + m + 1)
        window = clearance[y0:y1, x0:x1]
        stamp = disk[y0 - py + reach : y1 - py + reach, x0 - px + reach : x1 - px + reach]
        np.minimum(window, stamp - r32[k], out=window)
    return centres, placed


# ---- scenes -----------------------------------------------------------------------------------

def _check_classes(classes: Mapping[Class, int], cfg: WorldConfig) -> None:
    for key, n in classes.items():
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] in COLOURS and key[1] in SHAPES):
            raise ConfigError(
                f"scene class {key!r} is not a (colour, shape) pair; colours: {', '.join(COLOURS)}; "
                f"shapes: {', '.join(SHAPES)}"
            )
        if cfg.mode == "train" and key in HELD_OUT:
            raise ConfigError(
                f"{key[0]} {key[1]} is held out for zero-shot testing and is never drawn in 'train' "
                "mode; use WorldConfig(mode='test') for test scenes"
            )
        if int(n) < 0:
            raise ConfigError(f"count of {key[0]} {key[1]} must be >= 0, got {n}")


def sensor_noise(rng: np.random.Generator) -> int:
    """The camera's luminance noise for one image, in grey levels (`render.degrade`): 1-6, or none
    for 30% of images."""
    return int(rng.integers(1, 7)) if rng.random() < 0.7 else 0


def make_scene(
    rng: np.random.Generator | int,
    cfg: WorldConfig | None = None,
    classes: Mapping[Class, int] | None = None,
    width: int | None = None,
) -> Scene:
    """One scene. `classes` maps (colour, shape) -> requested count (default: random classes
    and counts allowed by cfg.mode). Objects that cannot be placed are dropped, so a class may
    end up with fewer objects than requested; the returned annotations are exactly what is drawn."""
    rng = as_rng(rng)
    cfg = cfg or WorldConfig()
    if width is None:
        width = int(rng.integers(cfg.min_width, cfg.max_width + 1))
    height = cfg.height
    if classes is None:
        chosen = sample_classes(rng, cfg)
        classes = {c: sample_count(rng, 1, cfg.max_per_class) for c in chosen}
    _check_classes(classes, cfg)
    keys = [k for k, n in classes.items() if int(n) > 0]
    counts = [int(classes[k]) for k in keys]

    sizes = _object_sizes(rng, cfg, counts, float(height * width))  # (N,)
    centres, placed = _place(rng, sizes / 2.0, height, width, cfg.separation)  # (N, 2), (N,)
    labels = [k for k, n in zip(keys, counts) for _ in range(n)]

    idx = np.flatnonzero(placed)
    idx = idx[rng.permutation(len(idx))]  # drawing order: classes interleave in depth
    labels = [labels[i] for i in idx]
    xs, ys, sizes = centres[idx, 0], centres[idx, 1], sizes[idx]
    angles = rng.uniform(0.0, 360.0, len(idx))
    colours = sample_object_colours(rng, [c for c, _ in labels])  # (n, 3) uint8
    polygons, boxes = object_polygons([s for _, s in labels], xs, ys, sizes, angles)  # N x (K, 2), (N, 4)

    background = render_background(rng, height, width)
    inner = None
    if cfg.effects and rng.random() < 0.25:  # a dark rim about 1 px wide
        inner, _ = object_polygons([s for _, s in labels], xs, ys, np.maximum(sizes - 2.5, 1.0), angles)
    # Blur is rare because it costs as much as the whole scene; training augmentation blurs too.
    blur = float(rng.uniform(0.3, 0.8)) if cfg.effects and rng.random() < 0.1 else 0.0
    noise = sensor_noise(rng) if cfg.effects else 0
    drawn = draw_objects(background, polygons, colours, antialias=cfg.antialias, inner=inner)
    image = degrade(drawn, rng, blur=blur, noise=noise)

    objects = [
        SceneObject(shape=shape, colour=colour, x=x, y=y, size=size, angle=angle, box=tuple(box), rgb=tuple(rgb))
        for (colour, shape), x, y, size, angle, box, rgb in zip(
            labels, xs.tolist(), ys.tolist(), sizes.tolist(), angles.tolist(), boxes.tolist(), colours.tolist()
        )
    ]
    return Scene(image=image, objects=objects)


def sample_training_example(rng: np.random.Generator | int, cfg: WorldConfig | None = None) -> tuple[Scene, str]:
    """A random scene and a prompt for one class in it, in any allowed wording ("red stars",
    "red star", "stars", "star"). The prompted class is chosen uniformly among the classes present,
    so it is often not the most numerous one. With cfg.absent_prompt_prob the prompt may name a
    class that is absent (count 0)."""
    rng = as_rng(rng)
    cfg = cfg or WorldConfig()
    scene = make_scene(rng, cfg)
    present = sorted(scene.class_counts())
    absent = [c for c in cfg.classes if c not in present]
    if not present or (absent and rng.random() < cfg.absent_prompt_prob):
        colour, shape = _pick(rng, absent)
        # Shape-only wording would often name a present shape of another colour: keep the colour.
        return scene, format_prompt(colour, shape, plural=rng.random() >= 0.2)
    colour, shape = _pick(rng, present)
    return scene, sample_prompt(rng, colour, shape)


# ---- test scenes ------------------------------------------------------------------------------

def _scene_with_target(
    rng: np.random.Generator, cfg: WorldConfig, classes: dict[Class, int], target: Class
) -> Scene:
    """make_scene, redrawn (same rng stream, so still deterministic) in the rare case that
    placement dropped every object of the target class."""
    for _ in range(10):
        scene = make_scene(rng, cfg, classes)
        if scene.class_counts().get(target, 0) > 0:
            return scene
    raise RuntimeError(f"could not place any {target[0]} {target[1]} in 10 tries; the scene is too crowded")


def make_held_out_scene(
    rng: np.random.Generator | int, cfg: WorldConfig | None = None, target: Class | None = None
) -> tuple[Scene, str]:
    """A scene whose prompted class is held out ("green triangles"); other classes may be anything."""
    rng = as_rng(rng)
    cfg = cfg or WorldConfig(mode="test")
    if cfg.mode != "test":
        raise ConfigError("held-out scenes draw held-out classes; pass WorldConfig(mode='test')")
    target = target or _pick(rng, sorted(HELD_OUT))
    if target not in HELD_OUT:
        raise ConfigError(f"{target} is not a held-out class; held out: {sorted(HELD_OUT)}")
    chosen = sample_classes(rng, cfg, first=target)
    classes = {c: sample_count(rng, 1, cfg.max_per_class) for c in chosen}
    return _scene_with_target(rng, cfg, classes, target), format_prompt(*target)


def make_fidelity_scene(
    rng: np.random.Generator | int,
    cfg: WorldConfig | None = None,
    target: Class | None = None,
    minority: tuple[int, int] = (1, 15),
    dominant: tuple[int, int] = (50, 200),
) -> tuple[Scene, str]:
    """A prompt-fidelity scene: the prompted class has few instances (1..15) and another class
    dominates (50..200), half the time sharing its colour or shape. A model that counts "whatever is
    there" instead of what the prompt names fails these (as FSC-147-S shows for real images)."""
    rng = as_rng(rng)
    cfg = cfg or WorldConfig(mode="test")
    pool = cfg.classes
    target = target or _pick(rng, list(pool))
    if target not in pool:
        raise ConfigError(f"{target} cannot be drawn in {cfg.mode!r} mode")
    lo, hi = cfg.classes_per_scene
    k = max(2, int(rng.integers(lo, hi + 1)))
    chosen = sample_classes(rng, cfg, first=target, k=k)
    classes = {target: int(rng.integers(minority[0], minority[1] + 1))}
    classes[chosen[1]] = int(rng.integers(dominant[0], dominant[1] + 1))
    for c in chosen[2:]:  # further distractors, never more than the dominant class
        classes[c] = sample_count(rng, 1, min(cfg.max_per_class, classes[chosen[1]] // 2))
    return _scene_with_target(rng, cfg, classes, target), format_prompt(*target)


def make_seen_scene(rng: np.random.Generator | int, cfg: WorldConfig | None = None) -> tuple[Scene, str]:
    """A scene drawn exactly like training scenes (training classes only) with a "<colour>
    <shape>" prompt: the in-distribution reference for held-out and fidelity scores."""
    rng = as_rng(rng)
    cfg = (cfg or WorldConfig()).replace(mode="train")
    target = _pick(rng, list(TRAIN_CLASSES))
    chosen = sample_classes(rng, cfg, first=target)
    classes = {c: sample_count(rng, 1, cfg.max_per_class) for c in chosen}
    return _scene_with_target(rng, cfg, classes, target), format_prompt(*target)


def make_test_example(
    rng: np.random.Generator | int, kind: str, cfg: WorldConfig | None = None
) -> tuple[Scene, str]:
    """Dispatch on kind: "held_out", "fidelity" or "seen"."""
    cfg = cfg or WorldConfig(mode="test")
    if kind == "held_out":
        return make_held_out_scene(rng, cfg)
    if kind == "fidelity":
        return make_fidelity_scene(rng, cfg)
    if kind == "seen":
        return make_seen_scene(rng, cfg)
    raise ConfigError(f"unknown test scene kind {kind!r}; choose one of {', '.join(TEST_KINDS)}")


__all__ = [
    "Class",
    "Scene",
    "SceneObject",
    "TEST_KINDS",
    "WorldConfig",
    "as_rng",
    "make_fidelity_scene",
    "make_held_out_scene",
    "make_scene",
    "make_seen_scene",
    "make_test_example",
    "sample_classes",
    "sample_count",
    "sample_training_example",
    "sensor_noise",
]
