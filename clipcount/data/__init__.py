"""Datasets, ground-truth density maps and augmentation.

Readers (`FSC147`, `FSC147S`, `CARPK`, `ShanghaiTech`, `FolderDataset`) return `CountingSample`s
(image in [0, 1], points, prompt); `build_dataset` picks one by name. `TrainingDataset` turns a
reader into the torch tensors training needs (augmented 384x384 crops and their density maps).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# `augment` (the policy function) is deliberately not re-exported: the name would shadow the
# `clipcount.data.augment` module. Use `from clipcount.data.augment import augment`.
from clipcount.data import augment as _augment_module
from clipcount.data.augment import (
    AugmentConfig,
    add_noise,
    apply_affine,
    colour_jitter,
    crop,
    gaussian_blur,
    hflip,
    mosaic,
    random_affine,
    random_crop,
    resize,
    resize_short_side,
    resize_to_height,
    rotate90,
    to_landscape,
    vflip,
)
from clipcount.data.carpk import CARPK
from clipcount.data.density import DensityCache, count_inside, points_to_density
from clipcount.data.folder import FolderDataset
from clipcount.data.fsc147 import FSC147
from clipcount.data.fsc147_s import FSC147S
from clipcount.data.sample import CountingDataset, CountingSample, SampleRecord, load_image, read_image_size
from clipcount.data.shanghaitech import ShanghaiTech
from clipcount.errors import ConfigError, DataError

__all__ = [
    "AugmentConfig", "CARPK", "CountingDataset", "CountingSample", "DensityCache", "FSC147", "FSC147S",
    "FolderDataset", "SampleRecord", "ShanghaiTech", "TrainingDataset", "DATASETS", "add_noise",
    "apply_affine", "build_dataset", "collate", "colour_jitter", "count_inside", "crop",
    "gaussian_blur", "hflip", "load_image", "mosaic", "points_to_density", "random_affine", "random_crop",
    "read_image_size", "resize", "resize_short_side", "resize_to_height", "rotate90", "to_landscape", "vflip",
]

DATASETS = ("fsc147", "fsc147-s", "carpk", "shanghaitech-a", "shanghaitech-b", "folder")


def build_dataset(name: str, root: str | Path, split: str | None = "test", **kw: Any) -> CountingDataset:
    """A reader by name: fsc147, fsc147-s, carpk, shanghaitech-a, shanghaitech-b or folder.

    `split` is ignored by fsc147-s (one list); a folder reads its split labels or holds out a fixed
    part (clipcount/data/folder.py; None: every image). Extra keywords go to the
    reader (skip_bad=, subset_json= for fsc147-s, annotations= for folder, tolerance=).
    """
    key = name.strip().lower().replace("_", "-")
    if key == "fsc147":
        return FSC147(root, split or "test", **kw)
    if key == "fsc147-s":
        return FSC147S(root, **kw)
    if key == "carpk":
        return CARPK(root, split or "test", **kw)
    if key in ("shanghaitech-a", "shanghaitech-b"):
        return ShanghaiTech(root, part=key[-1].upper(), split=split or "test", **kw)
    if key == "folder":
        return FolderDataset(root, split=split, **kw)
    raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


class TrainingDataset(torch.utils.data.Dataset):
    """Augmented square crops with density maps, for training.

    Item i: the base sample resized to height `image_height` (default `crop_size`) (points scaled), then `augment` (mosaic
    tiles come from other samples with the same prompt) ending in a random crop_size crop, and the
    density map of the points that remain. Returns dict(image=(3, S, S) float32 tensor in [0, 1],
    density=(1, S, S) float32 tensor, count=float (points in the crop), prompt=str, name=str).

    Randomness is seeded by (seed, epoch, index) only, so it is the same in any worker and across
    runs; call `set_epoch` each epoch for a new stream (with DataLoader(persistent_workers=False),
    the default, workers pick it up). `augment=False` keeps only the resize and random crop
    (validation crops).

    `image_height`: images are resized to this height before cropping (default: the crop size; a
    model with `ClipCountConfig.image_height` is trained on crops of images at that height).

    `background_share`: the chance that an item is instead a background crop (data/background.py):
    the largest square of the resized image with no point near it (at least crop_size / 8 wide),
    resized to the window, with an all-zero density. Images without one give an ordinary item.
    """

    def __init__(
        self,
        base: Sequence[CountingSample],
        crop_size: int = 384,
        augment_cfg: AugmentConfig | None = None,
        density_sigma: float = 1.0,
        density_scale: float = 60.0,
        seed: int = 0,
        augment: bool = True,
        background_share: float = 0.0,
        image_height: int | None = None,
    ):
        if not 0.0 <= background_share <= 1.0:
            raise ConfigError(f"background share must be between 0 and 1, not {background_share}")
        self.base = base
        self.background_share = float(background_share)
        self.crop_size = int(crop_size)
        self.image_height = self.crop_size if image_height is None else int(image_height)
        if self.image_height < self.crop_size:
            raise ConfigError(f"image height {self.image_height} must be at least the crop size {self.crop_size}")
        self.cfg = dataclasses.replace(augment_cfg or AugmentConfig(), crop_size=self.crop_size)
        self.density_sigma = float(density_sigma)
        self.density_scale = float(density_scale)
        self.seed = int(seed)
        self.augment = augment
        self.epoch = 0
        prompts = getattr(base, "prompts", None)
        if prompts is None:  # a plain sequence of samples: read them once for their prompts
            prompts = [base[i].prompt for i in range(len(base))]
        self._by_prompt: dict[str, list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            self._by_prompt[prompt].append(i)
        self._prompts = list(prompts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int) -> CountingSample:
        sample = self.base[index]
        if len(sample.points) == 0 and (sample.count_override or 0) > 0:
            raise DataError(
                f"{sample.name}: has a count but no point annotations, so no density map can be made; "
                "train on a dataset with points (e.g. FSC-147)"
            )
        return resize_to_height(sample, self.image_height)

    def _crop(self, sample: CountingSample, index: int, rng: np.random.Generator) -> CountingSample:
        """The ordinary item: the augmentation policy (or, without it, a random crop)."""
        if not self.augment:
            return random_crop(sample, self.crop_size, rng)
        peers = [j for j in self._by_prompt[self._prompts[index]] if j != index] or [int(index)]

        def extra() -> CountingSample:
            return self._load(int(rng.choice(peers)))

        return _augment_module.augment(sample, rng, self.cfg, extra)

    def _background_crop(self, sample: CountingSample, rng: np.random.Generator) -> CountingSample | None:
        """A point-free square of the sample resized to the window, or None if it has none big enough."""
        from clipcount.data.background import empty_square

        margin = max(2, int(np.ceil(3 * self.density_sigma)))  # no point's target mass reaches in
        found = empty_square(sample.points, sample.height, sample.width, max(1, self.crop_size // 8), margin, rng)
        if found is None:
            return None
        x0, y0, side = found
        return resize(crop(sample, x0, y0, side, side), self.crop_size, self.crop_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        sample = self._load(index)
        # drawn only when asked for, so that runs without background crops keep their random stream
        background = self.background_share > 0 and rng.random() < self.background_share
        out = self._background_crop(sample, rng) if background else None
        if out is None:
            out = self._crop(sample, index, rng)
        size = self.crop_size
        density = points_to_density(out.points, size, size, self.density_sigma, self.density_scale)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(out.image.transpose(2, 0, 1))),  # (3, S, S)
            "density": torch.from_numpy(density)[None],  # (1, S, S)
            "count": float(out.count),
            "prompt": out.prompt,
            "name": out.name,
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack TrainingDataset items: image (B, 3, S, S), density (B, 1, S, S), count (B,) float32,
    prompt and name as lists of B strings.

    Items with several prompts each (`prompts`: P strings, density (P, 1, S, S), count (P,), as
    `WithNegativePrompts` and the synthetic stream make them) give density (B, P, 1, S, S),
    count (B, P) and `prompts` as B lists of P strings."""
    if "prompts" in batch[0]:
        sizes = {len(b["prompts"]) for b in batch}
        if len(sizes) != 1:
            raise DataError(f"items of one batch must hold the same number of prompts, got {sorted(sizes)}")
        return {
            "image": torch.stack([b["image"] for b in batch]),
            "density": torch.stack([b["density"] for b in batch]),  # (B, P, 1, S, S)
            "count": torch.stack([torch.as_tensor(b["count"], dtype=torch.float32) for b in batch]),  # (B, P)
            "prompts": [list(b["prompts"]) for b in batch],
            "name": [b["name"] for b in batch],
        }
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "density": torch.stack([b["density"] for b in batch]),
        "count": torch.tensor([b["count"] for b in batch], dtype=torch.float32),
        "prompt": [b["prompt"] for b in batch],
        "name": [b["name"] for b in batch],
    }
