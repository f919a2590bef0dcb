"""Stage 0 of synthetic CLIP pretraining: teach a convolutional stem the shape and colour of objects
from crops centred on them, before the transformer on top ever sees a scene.

Why a stage of its own: in full scenes, a ViT (linear patchify or convolutional stem) trained on 2
CPU cores for 20 minutes learned colour but not shape: a per-patch linear probe of shape stayed at
chance (0.11-0.21 for six shapes), with scene captions, patch-level region targets or direct
per-patch shape labels alike. A convolutional stem classifying object-centred crops, each batch
drawn from many scenes, reaches 0.93 shape accuracy in 2718 steps (7 CPU minutes, after a plateau of
about 1000), and its stride-16 features then name the shape of the object under a patch in whole
scenes (a linear probe: 0.81). The stem is then frozen while the transformer learns from scenes
(`pretrain.py`). Used by the `cpu` recipe preset (with a HybridStem) and `cpu-stem` (a ConvStem).

Each crop shows one object (its centre jittered by up to a quarter of the crop) at the model's
scale: `crop_patches` patches of `vision.patch_size` model pixels, cut from the scene at the size
the 384-pixel window is seen at. Two linear heads (shape, colour) on the stem's pooled features are
trained by cross-entropy and thrown away; only the stem's weights are kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipcount.errors import ConfigError
from clipcount.modeling.clip import CLIP, ConvStem
from clipcount.synthetic.prompts import COLOURS, SHAPES
from clipcount.synthetic.world import WorldConfig, make_scene

OBJECTS_PER_SCENE = 4  # few crops per scene: batches of one scene's classes did not learn at all


@dataclass
class StemPretrainConfig:
    """Stage 0 (object crops). `steps` is an upper bound when `time_budget_s` is given."""

    steps: int = 0  # 0: no stage 0
    time_budget_s: float | None = None
    scenes_per_batch: int = 32  # OBJECTS_PER_SCENE crops each
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    crop_patches: int = 2  # crop side in patches at the model's scale
    window: int = 384  # the scene window the model sees at `vision.image_size` pixels
    log_every: int = 100
    precision: str = "auto"  # as PretrainConfig.precision: bf16 autocast for "bf16" (and "auto" on CUDA)


class ObjectCrops(torch.utils.data.Dataset):
    """Item i: the crops of scene i of the training world: images (K, 3, C, C) uint8 (C in scene
    pixels) and labels (K, 2) (shape index, colour index), K <= OBJECTS_PER_SCENE."""

    def __init__(self, length: int, crop: int, world: WorldConfig, seed: int = 0):
        if world.mode != "train":
            raise ConfigError("stem pretraining never draws held-out classes: use WorldConfig(mode='train')")
        self.length, self.crop, self.world, self.seed = int(length), int(crop), world, int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(index), 41]))
        scene = make_scene(rng, self.world)
        half, jitter = self.crop // 2, max(1, self.crop // 8)
        padded = np.pad(scene.image, ((half + jitter,) * 2, (half + jitter,) * 2, (0, 0)), mode="edge")
        images, labels = [], []
        for k in rng.permutation(len(scene.objects))[:OBJECTS_PER_SCENE]:
            obj = scene.objects[int(k)]
            x0 = int(round(obj.x)) + jitter + int(rng.integers(-jitter, jitter + 1))  # top-left in `padded`
            y0 = int(round(obj.y)) + jitter + int(rng.integers(-jitter, jitter + 1))
            images.append(padded[y0 : y0 + self.crop, x0 : x0 + self.crop].transpose(2, 0, 1))
            labels.append((SHAPES.index(obj.shape), COLOURS.index(obj.colour)))
        if not images:  # a scene whose objects could not be placed: no crops
            return {"image": torch.zeros(0, 3, self.crop, self.crop, dtype=torch.uint8),
                    "label": torch.zeros(0, 2, dtype=torch.long)}
        return {"image": torch.from_numpy(np.stack(images)), "label": torch.tensor(labels)}


def collate_crops(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"image": torch.cat([i["image"] for i in items]), "label": torch.cat([i["label"] for i in items])}


def crop_size(clip: CLIP, cfg: StemPretrainConfig) -> tuple[int, int]:
    """(crop side in scene pixels, in model pixels)."""
    model = cfg.crop_patches * clip.cfg.vision.patch_size
    return int(round(model * cfg.window / clip.cfg.vision.image_size)), model


def pretrain_stem(clip: CLIP, cfg: StemPretrainConfig, world: WorldConfig, seed: int = 0, num_workers: int = 0,
                  device: torch.device | str = "cpu", progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Train `clip.visual.conv1` (a ConvStem or HybridStem) in place on object crops; returns what happened:
    steps, seconds, and shape / colour accuracy over the last `log_every` steps. `threads`: torch
    threads of this process while it runs (restored after), None = leave them."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train_stem(clip, cfg, world, seed, num_workers, torch.device(device), progress)
    finally:
        torch.set_num_threads(previous)


def _train_stem(clip: CLIP, cfg: StemPretrainConfig, world: WorldConfig, seed: int, num_workers: int,
                device: torch.device, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from clipcount.synthetic.pretrain import autocast_for, preprocess

    stem = clip.visual.conv1
    if not isinstance(stem, ConvStem):
        raise ConfigError("stem pretraining needs a convolutional stem: VisionConfig(stem='conv' or 'hybrid')")
    scene_px, model_px = crop_size(clip, cfg)
    heads = nn.Linear(stem.width, len(SHAPES) + len(COLOURS)).to(device)
    params = list(stem.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = ObjectCrops(max(1, cfg.steps) * cfg.scenes_per_batch, scene_px, world.replace(mode="train"), seed)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.scenes_per_batch, num_workers=num_workers,
                                         collate_fn=collate_crops, prefetch_factor=4 if num_workers else None)
    started, step, window = time.time(), 0, []
    bar = tqdm(total=cfg.steps, desc="pretrain stem (object crops)", unit="step", disable=not progress,
               dynamic_ncols=True)
    stem.train()
    for batch in loader:
        if step >= cfg.steps or (cfg.time_budget_s is not None and time.time() - started >= cfg.time_budget_s):
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        images, labels = batch["image"].to(device), batch["label"].to(device)  # (K, 3, C, C), (K, 2)
        with autocast_for(device, cfg.precision):
            logits = heads(stem(preprocess(images, model_px)).mean(dim=(2, 3))).float()  # (K, shapes + colours)
        shape_logits, colour_logits = logits[:, : len(SHAPES)], logits[:, len(SHAPES) :]
        loss = F.cross_entropy(shape_logits, labels[:, 0]) + F.cross_entropy(colour_logits, labels[:, 1])
        if not math.isfinite(loss.item()):
            raise ConfigError(f"stem pretraining diverged at step {step + 1}; lower StemPretrainConfig.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        window.append(((shape_logits.argmax(1) == labels[:, 0]).float().mean().item(),
                       (colour_logits.argmax(1) == labels[:, 1]).float().mean().item()))
        window = window[-cfg.log_every :]
        bar.update(1)
        bar.set_postfix(shape=f"{np.mean([w[0] for w in window]):.2f}", colour=f"{np.mean([w[1] for w in window]):.2f}")
    bar.close()
    shape_acc = float(np.mean([w[0] for w in window])) if window else math.nan
    colour_acc = float(np.mean([w[1] for w in window])) if window else math.nan
    return {"steps": step, "seconds": round(time.time() - started, 1), "shape_accuracy": shape_acc,
            "colour_accuracy": colour_acc}


def freeze_stem(clip: CLIP) -> None:
    """Keep stage 0's stem as it is while the transformer learns from scenes."""
    clip.visual.conv1.requires_grad_(False)


__all__ = ["ObjectCrops", "StemPretrainConfig", "collate_crops", "crop_size", "freeze_stem", "pretrain_stem"]
