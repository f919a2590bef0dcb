"""What a training run keeps on disk, and how it comes back: checkpoints, RNG states, the metrics log.

    last/            model.safetensors + config.json + trainer_state.{safetensors,json}; written
                     into a temporary folder and swapped in whole (`swap_in`), never half-written
    final/           the model at the end of a call (same layout, no trainer state)
    metrics.jsonl    one JSON line every `log_every` steps (and TensorBoard when it imports)

`resume_from` restores the model, optimizer, scheduler, every RNG and the `Position` (step, epoch,
batch in epoch), so `engine.train.train` continues exactly where a run was interrupted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipcount.config import TrainConfig
from clipcount.engine.distributed import (
    DistContext,
    barrier,
    gather_objects,
    mean_across,
)
from clipcount.engine.trainer_state import load_trainer_state, save_trainer_state
from clipcount.engine.weight_average import WeightAverage
from clipcount.errors import CheckpointError, ConfigError
from clipcount.modeling.checkpoint import WEIGHTS_NAME, save_model
from clipcount.modeling.clip_count import ClipCount

LAST, FINAL = "last", "final"
METRICS_FILE = "metrics.jsonl"


@dataclass
class Position:
    """How far training has come: optimizer steps in all, and batches done in the current epoch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    seconds: float = 0.0  # training time in all, over every resumed call (for TrainConfig.max_seconds)


# ---- RNG ----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, numpy, python)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state[0], numpy_state[1].astype(np.uint32), *numpy_state[2:]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- checkpoints --------------------------------------------------------------------------------

def save_checkpoint(out_dir: Path, name: str, model: ClipCount, optimizer, scheduler, pos: Position,
                    cfg: TrainConfig, ctx: DistContext, average: WeightAverage | None = None) -> Path:
    """Write out_dir/<name> whole: into a temporary folder, then renamed into place.

    Every process must call it (the RNG states of all ranks are gathered); rank 0 writes.
    With an optimizer the trainer state is written too (for resuming), holding `average` if given.
    """
    rngs = gather_objects(ctx, rng_state()) if optimizer is not None else None
    target = out_dir / name
    if ctx.is_main:
        tmp = out_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {"training": {"step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch,
                              "train_config": _config_dict(cfg), "world_size": ctx.world_size}}
        save_model(model, tmp, extra=extra)
        if optimizer is not None:
            state = {
                "position": asdict(pos),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rngs,
                "train_config": _config_dict(cfg),
                "world_size": ctx.world_size,
            }
            if average is not None:
                state["weight_average"] = average.state_dict()
            save_trainer_state(tmp, state)
        swap_in(tmp, target)
    barrier(ctx)
    return target


def swap_in(tmp: Path, target: Path) -> None:
    """Replace folder `target` by `tmp` with renames only; a kill at any point leaves a whole one.

    The old folder is moved aside to `.<name>.old` first; if a kill falls between the two renames,
    `find_checkpoint` picks that one up.
    """
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: Path, name: str = LAST) -> Path | None:
    """out_dir/<name>, or the previous one left aside by an interrupted swap; None if neither."""
    for folder in (out_dir / name, out_dir / f".{name}.old"):
        if (folder / WEIGHTS_NAME).is_file():
            return folder
    return None


def resume_from(out_dir: Path, model: ClipCount, optimizer, scheduler, cfg: TrainConfig, ctx: DistContext,
                device: torch.device, progress: bool, average: WeightAverage | None = None) -> Position:
    """Load the model, optimizer, scheduler, RNG, position and `average` (if any) from out_dir/last.

    A checkpoint saved without a weight average starts `average` from the loaded weights."""
    from safetensors.torch import load_file

    from clipcount.modeling.weights import load_state_strict

    folder = find_checkpoint(out_dir, LAST)
    if folder is None:
        if ctx.is_main and progress:
            print(f"clipcount: no checkpoint in {out_dir / LAST}; starting from scratch")
        return Position()
    state = load_trainer_state(folder)
    pos = Position(**state["position"])
    _check_resumable(state, cfg, ctx, pos, folder)
    weights = folder / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights), device=str(device))
    except Exception as error:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{weights} is unreadable ({error}); resume from another checkpoint") from None
    load_state_strict(model, tensors, str(weights))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _resume_average(average, state, folder, ctx.is_main and progress)
    rngs = state["rng"] or []
    if ctx.rank < len(rngs):
        set_rng_state(rngs[ctx.rank])
    else:  # more processes than when saved: new ranks get fresh, distinct streams
        seed_everything(cfg.seed + ctx.rank + 7919 * pos.step)
    if ctx.is_main and progress:
        print(f"clipcount: resuming from {folder} at step {pos.step} (epoch {pos.epoch}, batch {pos.batch})")
    return pos


def _resume_average(average: WeightAverage | None, state: dict[str, Any], folder: Path, say: bool) -> None:
    if average is None:
        return
    if "weight_average" in state:
        average.load_state_dict(state["weight_average"])
    else:
        average.restart()  # from the weights just loaded, not those the model was built with
        if say:
            print(f"clipcount: {folder} holds no weight average; the average starts from its weights")


def _check_resumable(state: dict[str, Any], cfg: TrainConfig, ctx: DistContext, pos: Position, folder: Path) -> None:
    """Mid-epoch, the data order depends on seed, batch size and process count: they must match."""
    if pos.batch == 0:
        return
    saved = state.get("train_config", {})
    changed = [key for key in ("seed", "batch_size") if saved.get(key) != getattr(cfg, key)]
    if state.get("world_size") != ctx.world_size:
        changed.append("number of processes")
    if changed:
        raise ConfigError(
            f"{folder} was saved in the middle of an epoch with a different {', '.join(changed)}; resume "
            "with the same settings (or start a new output folder)"
        )


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


# ---- logging ------------------------------------------------------------------------------------

class MetricsLogger:
    """metrics.jsonl (and TensorBoard when available) on rank 0; loss averaged over the log window
    and over processes. On resume the lines past the checkpoint's step (written by the run that was
    interrupted) are dropped so the log reads as one run."""

    def __init__(self, out_dir: Path, ctx: DistContext, keep_until: int | None, tensorboard: bool = True):
        self.ctx = ctx
        self.path = out_dir / METRICS_FILE
        self.window: list[tuple[float, float, float]] = []
        self.started = time.time()
        self.file = None
        self.writer = None
        if not ctx.is_main:
            return
        kept = _read_lines_until(self.path, keep_until) if keep_until is not None else []
        self.file = open(self.path, "w", encoding="utf-8")
        self.file.writelines(kept)
        self.file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - TensorBoard is optional; any import problem means "off"
                self.writer = None

    def step(self, pos: Position, stage: str, total: float, contrastive: float, mse: float, lr: float,
             every: int, device: torch.device) -> None:
        self.window.append((total, contrastive, mse))
        if every <= 0 or pos.step % every:
            return
        means = [mean_across(self.ctx, sum(v) / len(v), device) for v in zip(*self.window)]
        self.window.clear()
        if self.file is None:
            return
        record = {"step": pos.step, "epoch": pos.epoch, "stage": stage, "loss": means[0],
                  "contrastive": means[1], "density": means[2], "lr": lr,
                  "time": round(time.time() - self.started, 3), "timestamp": round(time.time(), 3)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in ("loss", "contrastive", "density", "lr"):
                self.writer.add_scalar(f"train/{key}", record[key], pos.step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _read_lines_until(path: Path, step: int) -> list[str]:
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill
    return kept


__all__ = [
    "FINAL",
    "LAST",
    "METRICS_FILE",
    "MetricsLogger",
    "Position",
    "find_checkpoint",
    "resume_from",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "swap_in",
]
