"""Fresh synthetic training examples, generated on demand in DataLoader worker processes.

Two map-style datasets draw 384x384 crops of wide scenes of the procedural world, never holding a
held-out class (the world runs in mode "train"):

- `CountingStream`: items in the format of `clipcount.data.TrainingDataset` (image, density,
  count, prompt, name), so `clipcount.engine.train.train` consumes it unchanged. The prompt names a
  class present in the crop (any wording: "red stars", "red star", "stars", "star"), or, with
  `absent_prob`, a similar training class that is absent; the density map holds exactly the
  objects that prompt refers to whose centres lie inside the crop.
- `CaptionStream`: (crop, caption) pairs for contrastive CLIP pretraining. The crop is cut first and
  the caption describes what is inside it (classes and counts of the objects whose centres are in
  the crop), never the whole scene.

Determinism: everything about an item comes from `(seed, epoch, index)` through a numpy
SeedSequence, so any worker, any number of workers and a resumed run produce the same data. With
`crops_per_scene` = k > 1 a batch takes k crops from each scene (rendering a wide scene costs 2-4
times a crop's density map, so this nearly halves the generation time per example); the scene of a
group is seeded by the group's first index, so an item then depends on the indices it is batched
with, which the trainer fixes by (seed, epoch).

Epochs: the datasets have a nominal length (`length` items per epoch) and `set_epoch` switches to
new scenes, so every epoch of training sees fresh data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from clipcount.data.density import points_to_density
from clipcount.errors import ConfigError, DataError
from clipcount.synthetic.captions import caption_for
from clipcount.synthetic.prompts import (
    ALL_CLASSES,
    HELD_OUT,
    SHAPES,
    TRAIN_CLASSES,
    format_prompt,
    hard_negatives,
    parse_prompt,
    sample_prompt,
)
from clipcount.synthetic.render import degrade, object_polygons, render_background
from clipcount.synthetic.world import Scene, SceneObject, WorldConfig, make_scene, sensor_noise

# Tags mixed into the seed sequences so that scenes, crops and the two datasets never share a stream.
_SCENE_TAG, _CROP_TAG = 1, 2
_COUNTING_TAG, _CAPTION_TAG = 11, 12


# ---- crops --------------------------------------------------------------------------------------

def crop_scene(scene: Scene, x0: int, y0: int, size: int) -> Scene:
    """The size x size window of `scene` at (x0, y0), as a Scene of its own.

    An object belongs to the crop when its centre (annotated point) lies in [x0, x0 + size) x
    [y0, y0 + size); its coordinates and box are shifted into the crop. This is the rule
    `points_to_density` applies, so a crop's density map holds exactly its objects.
    """
    if not (0 <= x0 <= scene.width - size and 0 <= y0 <= scene.height - size):
        raise ConfigError(f"crop {size}x{size} at ({x0}, {y0}) does not fit a {scene.width}x{scene.height} scene")
    inside = [o for o in scene.objects if x0 <= o.x < x0 + size and y0 <= o.y < y0 + size]
    return Scene(
        image=np.ascontiguousarray(scene.image[y0 : y0 + size, x0 : x0 + size]),
        objects=[_shift(o, x0, y0) for o in inside],
    )


def _shift(obj: SceneObject, dx: float, dy: float) -> SceneObject:
    x1, y1, x2, y2 = obj.box
    return dataclasses.replace(obj, x=obj.x - dx, y=obj.y - dy, box=(x1 - dx, y1 - dy, x2 - dx, y2 - dy))


def random_crop(scene: Scene, rng: np.random.Generator, size: int) -> Scene:
    """A uniformly placed size x size crop (the scene must be at least that large)."""
    return crop_scene(scene, *random_offset(scene, rng, size), size)


def random_offset(scene: Scene, rng: np.random.Generator, size: int) -> tuple[int, int]:
    """The top-left corner (x0, y0) of a uniformly placed size x size crop."""
    x0 = int(rng.integers(0, scene.width - size + 1))
    y0 = int(rng.integers(0, scene.height - size + 1))
    return x0, y0


def class_fractions(scene: Scene, x0: int, y0: int, size: int, grid: int) -> np.ndarray:
    """What covers each patch of the size x size window at (x0, y0): (grid * grid, 1 + C) float32,
    row-major patches; column 0 is background, column 1 + k the share of the patch's pixels painted
    by class ALL_CLASSES[k] (later objects on top, as drawn). Every object overlapping the window
    counts, including those whose centre lies outside it. Rows sum to 1.

    The region-level signal of synthetic CLIP pretraining: what real CLIP's patch tokens learn from
    web-scale data (this patch shows part of a red circle), taught directly from the annotations."""
    from PIL import Image, ImageDraw

    ids = Image.new("I", (size, size), 0)  # 32-bit integer canvas: class index + 1, 0 = background
    objects = [o for o in scene.objects
               if o.box[2] >= x0 and o.box[0] < x0 + size and o.box[3] >= y0 and o.box[1] < y0 + size]
    if objects:
        polygons, _ = object_polygons(
            [o.shape for o in objects], np.array([o.x - x0 for o in objects]), np.array([o.y - y0 for o in objects]),
            np.array([o.size for o in objects]), np.array([o.angle for o in objects]),
        )
        draw = ImageDraw.Draw(ids)
        for o, polygon in zip(objects, polygons):
            draw.polygon(polygon.ravel().tolist(), fill=1 + ALL_CLASSES.index((o.colour, o.shape)))
    labels = np.asarray(ids, dtype=np.int64)  # (S, S)
    cell = np.minimum(np.arange(size) * grid // size, grid - 1)  # patch row/column of each pixel
    patch = cell[:, None] * grid + cell[None, :]  # (S, S)
    width = 1 + len(ALL_CLASSES)
    counts = np.bincount((patch * width + labels).ravel(), minlength=grid * grid * width)
    counts = counts.reshape(grid * grid, width).astype(np.float32)
    return counts / counts.sum(axis=1, keepdims=True)


def check_no_held_out(scene: Scene) -> None:
    """A training scene that holds a held-out class would leak it: refuse loudly."""
    leaked = sorted(c for c in scene.class_counts() if c in HELD_OUT)
    if leaked:
        raise DataError(f"a training scene holds held-out classes {leaked}; streams need WorldConfig(mode='train')")


def choose_prompt(crop: Scene, scene: Scene, rng: np.random.Generator, absent_prob: float = 0.0) -> str:
    """A prompt for a class present in the crop (uniform over classes, any wording); when the crop
    holds no object at all, a class of the whole scene (true count 0 in the crop).

    With probability `absent_prob` the prompt names a training class absent from the crop, chosen
    among those sharing a colour or a shape with a present class ("blue circles" beside red circles
    and blue squares): the answer is then (mostly) 0, which teaches the model to read both words
    of the prompt instead of counting whatever is prominent. Held-out classes are never named.
    """
    present = sorted(crop.class_counts())
    if present and absent_prob > 0 and rng.random() < absent_prob:
        absent = [c for c in TRAIN_CLASSES if c not in present]
        near = [c for c in absent if any(c[0] == p[0] or c[1] == p[1] for p in present)]
        pool = near or absent
        if pool:
            colour, shape = pool[int(rng.integers(len(pool)))]
            return sample_prompt(rng, colour, shape)
    classes = present or sorted(scene.class_counts())
    if not classes:  # a scene whose every object failed placement: never happens with counts >= 1
        raise DataError("a synthetic scene came out empty; check the WorldConfig (max_size, widths)")
    colour, shape = classes[int(rng.integers(len(classes)))]
    return sample_prompt(rng, colour, shape)


def choose_prompts(crop: Scene, scene: Scene, rng: np.random.Generator, n: int, negative_share: float,
                   hard_negative_share: float) -> list[str]:
    """`n` prompts for one crop. The first names a class present in the crop (any wording); each
    further prompt names an absent training class with probability `negative_share` (all-zero
    target), else another present class or wording. A share `hard_negative_share` of the
    negatives differs from a present class in exactly one attribute (`hard_negatives`); the rest
    are any absent class, sometimes as a shape-only prompt for a shape absent in every colour.
    Held-out classes are never named."""
    present = sorted(crop.class_counts())
    prompts = [choose_prompt(crop, scene, rng)]
    for _ in range(n - 1):
        negative = rng.random() < negative_share if present else False
        for _ in range(4):  # a few tries for a prompt not asked yet (a crop may hold one class)
            prompt = (_negative_prompt(present, rng, hard_negative_share) if negative
                      else choose_prompt(crop, scene, rng))
            if prompt not in prompts:
                break
        prompts.append(prompt)
    return prompts


def _negative_prompt(present: list[tuple[str, str]], rng: np.random.Generator, hard_share: float) -> str:
    hard = hard_negatives(present, TRAIN_CLASSES)
    if hard and rng.random() < hard_share:
        return sample_prompt(rng, *hard[int(rng.integers(len(hard)))], shape_only_prob=0.0)
    absent_shapes = [s for s in SHAPES if all(p[1] != s for p in present)]
    if absent_shapes and rng.random() < 0.2:
        return format_prompt(None, absent_shapes[int(rng.integers(len(absent_shapes)))], plural=rng.random() >= 0.2)
    absent = [c for c in TRAIN_CLASSES if c not in set(present)]
    return sample_prompt(rng, *absent[int(rng.integers(len(absent)))], shape_only_prob=0.0)


# ---- the datasets -------------------------------------------------------------------------------

class _SceneCrops(torch.utils.data.Dataset):
    """Shared machinery: seeding, epochs, and k crops per rendered scene."""

    tag = 0

    def __init__(self, length: int, seed: int = 0, world: WorldConfig | None = None, crop_size: int = 384,
                 crops_per_scene: int = 1):
        world = world or WorldConfig()
        if world.mode != "train":
            raise ConfigError("training streams never draw held-out classes: use WorldConfig(mode='train')")
        if crop_size > min(world.height, world.min_width):
            raise ConfigError(
                f"crop size {crop_size} does not fit the world's smallest scene "
                f"({world.height}x{world.min_width}); raise WorldConfig.min_width or lower the crop size"
            )
        if length < 1 or crops_per_scene < 1:
            raise ConfigError(f"length ({length}) and crops_per_scene ({crops_per_scene}) must be >= 1")
        self.length = int(length)
        self.seed = int(seed)
        self.world = world
        self.crop_size = int(crop_size)
        self.crops_per_scene = int(crops_per_scene)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int, tag: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(index), self.tag, tag]))

    def scene(self, index: int) -> Scene:
        scene = make_scene(self._rng(index, _SCENE_TAG), self.world)
        check_no_held_out(scene)
        return scene

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a stream of {self.length} items per epoch")
        return self.make_item(self.scene(index), index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A whole batch: consecutive groups of `crops_per_scene` indices share one scene."""
        items = []
        for first in range(0, len(indices), self.crops_per_scene):
            group = [int(i) for i in indices[first : first + self.crops_per_scene]]
            scene = self.scene(group[0])
            items.extend(self.make_item(scene, i) for i in group)
        return items

    def make_item(self, scene: Scene, index: int) -> dict[str, Any]:
        raise NotImplementedError


def blank_crop(rng: np.random.Generator, size: int) -> Scene:
    """A (size, size) crop of background only, with the world's camera noise: without such crops
    every training window holds objects, and the model never learns what "none here" looks like
    (the cpu-stem counter counted 2.8 objects on a blank benchmark image)."""
    noise = sensor_noise(rng)  # drawn before the background, as ever: the same crops from the same seed
    return Scene(image=degrade(render_background(rng, size, size), rng, blur=0.0, noise=noise), objects=[])


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]. Converted by numpy: torch's intra-op
    threads only slow a copy this small down when the cores are busy generating scenes."""
    chw = image.transpose(2, 0, 1).astype(np.float32)
    return torch.from_numpy(np.multiply(chw, np.float32(1.0 / 255.0), out=chw))


class CountingStream(_SceneCrops):
    """Counting examples in the format of `clipcount.data.TrainingDataset`: dict(image (3, S, S)
    float32 in [0, 1], density (1, S, S) float32, count float, prompt str, name str).

    With `prompts_per_image` P > 1 an item holds P prompts for the one crop, each with its own
    target: prompts (P strings), density (P, 1, S, S), count (P,) (see `choose_prompts`): several
    classes of a mixed crop, each counted on its own, and absent classes with all-zero targets, so
    the model has to read the prompt to get the loss down."""

    tag = _COUNTING_TAG

    def __init__(self, length: int, seed: int = 0, world: WorldConfig | None = None, crop_size: int = 384,
                 crops_per_scene: int = 1, density_sigma: float = 1.0, density_scale: float = 60.0,
                 absent_prob: float = 0.0, prompts_per_image: int = 1, negative_share: float = 0.0,
                 hard_negative_share: float = 0.5, blank_share: float = 0.0):
        super().__init__(length, seed, world, crop_size, crops_per_scene)
        for name, value in (("absent_prob", absent_prob), ("negative_share", negative_share),
                            ("hard_negative_share", hard_negative_share), ("blank_share", blank_share)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if prompts_per_image < 1:
            raise ConfigError(f"prompts_per_image must be >= 1, got {prompts_per_image}")
        self.density_sigma = float(density_sigma)
        self.density_scale = float(density_scale)
        self.absent_prob = float(absent_prob)
        self.prompts_per_image = int(prompts_per_image)
        self.negative_share = float(negative_share)
        self.hard_negative_share = float(hard_negative_share)
        self.blank_share = float(blank_share)

    def make_item(self, scene: Scene, index: int) -> dict[str, Any]:
        rng = self._rng(index, _CROP_TAG)
        crop = random_crop(scene, rng, self.crop_size)
        # drawn only when asked for, so runs without blank crops keep their data
        if self.blank_share > 0 and rng.random() < self.blank_share:
            crop = blank_crop(rng, self.crop_size)  # prompts still name the scene's classes: all 0
        if self.prompts_per_image == 1:
            prompt = choose_prompt(crop, scene, rng, self.absent_prob)
            density, count = self._target(crop, prompt)
            return {"image": image_tensor(crop.image), "density": density, "count": count, "prompt": prompt,
                    "name": f"stream-{self.seed}-{self.epoch}-{index}"}
        prompts = choose_prompts(crop, scene, rng, self.prompts_per_image, self.negative_share,
                                 self.hard_negative_share)
        targets = [self._target(crop, prompt) for prompt in prompts]
        return {
            "image": image_tensor(crop.image),  # (3, S, S)
            "density": torch.stack([d for d, _ in targets]),  # (P, 1, S, S)
            "count": torch.tensor([c for _, c in targets], dtype=torch.float32),  # (P,)
            "prompts": prompts,
            "name": f"stream-{self.seed}-{self.epoch}-{index}",
        }

    def _target(self, crop: Scene, prompt: str) -> tuple[torch.Tensor, float]:
        """The density map (1, S, S) of the objects the prompt names whose centres lie in the crop."""
        points = crop.points(*parse_prompt(prompt))  # (N, 2) x, y inside the crop
        size = self.crop_size
        density = points_to_density(points, size, size, self.density_sigma, self.density_scale)  # (S, S)
        return torch.from_numpy(density)[None], float(len(points))


class CaptionStream(_SceneCrops):
    """CLIP pretraining pairs: dict(image (3, S, S) uint8, tokens (L,) int64, caption str).

    Images stay uint8 until the GPU (4x less to pass between processes). Captions are tokenised in
    the worker by CLIP's tokenizer, made there on first use (it holds a lock, which cannot be
    pickled to a spawned worker).
    """

    tag = _CAPTION_TAG

    def __init__(self, length: int, context_length: int, seed: int = 0, world: WorldConfig | None = None,
                 crop_size: int = 384, crops_per_scene: int = 1, patch_grid: int | None = None):
        super().__init__(length, seed, world, crop_size, crops_per_scene)
        self.context_length = int(context_length)
        self.patch_grid = patch_grid  # with a grid, items also carry `class_fractions` per patch
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from clipcount.modeling.tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer()
        return self._tokenizer

    def make_item(self, scene: Scene, index: int) -> dict[str, Any]:
        rng = self._rng(index, _CROP_TAG)
        x0, y0 = random_offset(scene, rng, self.crop_size)
        crop = crop_scene(scene, x0, y0, self.crop_size)
        caption = caption_for(crop, rng)  # describes the crop, not the scene
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(crop.image.transpose(2, 0, 1))),  # (3, S, S) uint8
            "tokens": self.tokenizer(caption, context_length=self.context_length)[0],  # (L,)
            "caption": caption,
        }
        if self.patch_grid:
            fractions = class_fractions(scene, x0, y0, self.crop_size, self.patch_grid)
            item["class_fractions"] = torch.from_numpy(fractions)  # (G * G, 1 + C)
        return item


def collate_captions(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """CaptionStream items -> image (B, 3, S, S) uint8, tokens (B, L) int64, caption list."""
    out = {
        "image": torch.stack([b["image"] for b in batch]),
        "tokens": torch.stack([b["tokens"] for b in batch]),
        "caption": [b["caption"] for b in batch],
    }
    if "class_fractions" in batch[0]:
        out["class_fractions"] = torch.stack([b["class_fractions"] for b in batch])  # (B, G * G, 1 + C)
    return out


def mean_training_count(world: WorldConfig | None = None, seed: int = 0, n: int = 500) -> float:
    """The mean true count of the prompted class over `n` whole training scenes.

    The training-mean baseline of the counting benchmark: always answering this number. Whole
    scenes (not crops), because the benchmark counts whole scenes; the scenes and prompts are drawn
    as `sample_training_example` draws them, from seeds (seed, i) of their own.
    """
    from clipcount.synthetic.world import sample_training_example

    world = (world or WorldConfig()).replace(mode="train", absent_prompt_prob=0.0)
    counts = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i, 99]))
        scene, prompt = sample_training_example(rng, world)
        counts.append(scene.count(prompt))
    return float(np.mean(counts))


__all__ = [
    "CaptionStream",
    "CountingStream",
    "check_no_held_out",
    "choose_prompt",
    "choose_prompts",
    "class_fractions",
    "collate_captions",
    "crop_scene",
    "image_tensor",
    "mean_training_count",
    "random_crop",
    "random_offset",
]
