"""Two-stage training of CLIP-Count, resumable exactly, on one or many processes.

Stage 1 (epochs [0, contrastive_epochs)): only the patch-text contrastive loss, which aligns the
prompted image tower's patches with the text before the density head exists in the loop. Stage 2
(the remaining density_epochs): the density MSE (plus, optionally, the contrastive loss with
weight `contrastive_weight_stage2`, 0 by default as published). One AdamW over the trainable
parameters for the whole run; parameters a stage does not use get no gradient and are not
touched (AdamW skips them, weight decay included). The learning rate is multiplied by `lr_decay`
every `lr_decay_every` epochs. Training stops early at `max_steps` or after `max_seconds` of
training (summed over resumed calls; every process follows rank 0's clock).

Output folder (`run_folder.py` writes and reads it):
    last/      model.safetensors + config.json + trainer_state.{safetensors,json}, every
               `checkpoint_every` steps and at the end; swapped in whole, never half-written
    final/     the model at the end of the call (same layout, no trainer state); with `ema_decay`
               the moving average of the weights (`weight_average.py`), while last/ holds the raw ones
    metrics.jsonl   one JSON line every `log_every` steps
    tensorboard/    when torch.utils.tensorboard imports

Exact resume: the data order of an epoch is a function of (seed, epoch) and each sample's
augmentation of (seed, epoch, index), so a resumed run replays the same epoch, skips the batches
already done, and restores the optimizer, scheduler and every RNG (torch CPU/CUDA, numpy, python)
as they were at the checkpoint. On CPU with the same number of threads the weights come out
bit-identical to an uninterrupted run.

Published facts this follows (reference notes; songrise/CLIP-Count run.py): AdamW lr 1e-4, betas
(0.9, 0.95), weight decay 0.05, StepLR(100 epochs, x0.33) stepped per epoch, contrastive loss
replacing the density loss in the first epochs. (Their Lightning run trains epochs + 20 = 220 epochs
and tests `epoch <= 20`, so 21 contrastive epochs; our config says 20 + 180.)
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipcount.config import TrainConfig
from clipcount.engine.distributed import (
    DistContext,
    barrier,
    current_context,
    device_for,
    env_context,
    init_from_env,
    rank0_decides,
)
from clipcount.engine.losses import (
    count_mse_loss,
    density_mse_loss,
    empty_count_loss,
    patch_text_contrastive_loss,
)
from clipcount.engine.run_folder import (
    FINAL,
    LAST,
    MetricsLogger,
    Position,
    find_checkpoint,
    resume_from,
    save_checkpoint,
    seed_everything,
)
from clipcount.engine.weight_average import WeightAverage
from clipcount.errors import ClipCountError, ConfigError
from clipcount.modeling.clip_count import ClipCount


class TrainingError(ClipCountError, RuntimeError):
    """Training cannot go on (the loss became NaN or infinite)."""


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # global optimizer steps done
    epoch: int  # the epoch training would continue in
    finished: bool  # every epoch done (False when max_steps stopped it)
    losses: list[float] = field(default_factory=list)  # this process's loss at each step of this call
    last_checkpoint: Path | None = None
    final_checkpoint: Path | None = None
    seconds: float = 0.0


class TrainingObjective(nn.Module):
    """The model and both losses in one `forward`, so DistributedDataParallel sees every use.

    forward(images (B, 3, S, S) in [0, 1], density (B, 1, S, S), prompts (B strings),
    contrastive_weight, density_weight) -> (total, contrastive, density) scalars (fp32). A loss
    with weight 0 is not computed, so stage 1 never runs the interaction or decoder.

    Several prompts per image: density (B, P, 1, S, S) and prompts as B lists of P strings. Each
    image is encoded once and its patch tokens (and the prompt-free start of the interaction) are
    shared by its P prompts; the losses average over the B * P (image, prompt) pairs, and the
    contrastive loss leaves out pairs with nothing to count (negative prompts).
    """

    def __init__(self, model: ClipCount, temperature: float, autocast_dtype: torch.dtype | None,
                 count_weight: float = 0.0, empty_count_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.autocast_dtype = autocast_dtype
        self.count_weight = count_weight  # beside the density MSE: count_mse_loss
        self.empty_count_weight = empty_count_weight  # beside it too: empty_count_loss

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(
        self,
        images: torch.Tensor,
        density: torch.Tensor,
        prompts: Sequence[str] | Sequence[Sequence[str]],
        contrastive_weight: float,
        density_weight: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        per_image = density.shape[1] if density.dim() == 5 else 1  # P
        flat_prompts = [p for group in prompts for p in group] if density.dim() == 5 else list(prompts)
        density = density.flatten(0, 1) if density.dim() == 5 else density  # (B * P, 1, S, S)
        zero = torch.zeros((), device=images.device)
        contrastive, mse = zero, zero
        with self._autocast(images.device):
            tokens = model.encode_image(images)  # (B, N, Cv)
            text = model.encode_text(flat_prompts)  # (B * P, 1, E)
            feats = None
            if contrastive_weight:
                feats = model.contrastive_features(tokens).repeat_interleave(per_image, dim=0)  # (B * P, N, E)
            pred = None
            if density_weight:
                shared = model.shared_features(tokens).repeat_interleave(per_image, dim=0)  # (B * P, N, C)
                pred = model.density_from_shared(shared, text, images.shape[-2:])  # (B * P, 1, S, S)
        total = zero
        if feats is not None:
            grid = int(math.isqrt(tokens.shape[1]))
            contrastive = patch_text_contrastive_loss(
                feats, text, density, (grid, grid), self.temperature, pool=model.config.clip.vision.patch_size
            )
            total = total + contrastive_weight * contrastive
        if pred is not None:
            mse = density_mse_loss(pred, density)
            total = total + density_weight * mse
            if self.count_weight:
                count = count_mse_loss(pred, density, model.config.density_scale)
                total = total + density_weight * self.count_weight * count
            if self.empty_count_weight:
                empty = empty_count_loss(pred, density, model.config.density_scale)
                total = total + density_weight * self.empty_count_weight * empty
        return total, contrastive.detach(), mse.detach()


# ---- the training loop --------------------------------------------------------------------------

def train(
    model: ClipCount,
    dataset: torch.utils.data.Dataset,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = False,
    device: str | torch.device | None = None,
    distributed: DistContext | bool | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `model` on `dataset` (a TrainingDataset: items dict(image, density, prompt, ...)).

    `resume=True` continues from out_dir/last if it exists (else starts fresh, saying so); without
    it, a folder that already holds a run is refused rather than overwritten. Seeds torch, numpy
    and random with cfg.seed + rank (dropout and anything else drawn from the global RNGs).
    `distributed`: None joins the process group torchrun describes (if any), False forces one
    process, a DistContext uses an initialised group. `cfg.batch_size` is the global batch; each of
    W processes takes batch_size / W.
    """
    started = time.time()
    ctx = _resolve_context(distributed)
    device = device_for(ctx, device)
    out_dir = Path(out_dir)
    total_epochs = cfg.contrastive_epochs + cfg.density_epochs
    local_batch = _local_batch(cfg.batch_size, ctx.world_size)
    if len(dataset) == 0:
        raise ConfigError("the training dataset is empty; check the dataset root and split")
    _check_limits(cfg)
    if not resume and find_checkpoint(out_dir, LAST) is not None:
        raise ConfigError(f"{out_dir} already holds a training run; resume it (--resume) or choose another output folder")
    barrier(ctx)  # every process has looked before rank 0 writes anything
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(cfg.seed + ctx.rank)
    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.lr_decay_every), gamma=cfg.lr_decay)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    pos = Position()
    if resume:
        pos = resume_from(out_dir, model, optimizer, scheduler, cfg, ctx, device, progress, average)
    objective = TrainingObjective(model, cfg.contrastive_temperature, _autocast_dtype(cfg.precision, device),
                                  cfg.count_weight, cfg.empty_count_weight)
    runner: nn.Module = objective
    if ctx.enabled:
        runner = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # stage 1 leaves the decoder unused, stage 2 the contrastive head
        )

    logger = MetricsLogger(out_dir, ctx, keep_until=pos.step if resume else None, tensorboard=True)
    result = TrainResult(out_dir=out_dir, step=pos.step, epoch=pos.epoch, finished=False)
    batches_per_epoch = math.ceil(_sampler(dataset, cfg, ctx, 0).num_samples / local_batch)
    bar = _progress_bar(progress and ctx.is_main, pos, cfg, total_epochs, batches_per_epoch)
    last_saved = -1
    clock = _Clock(pos.seconds)
    try:
        while pos.epoch < total_epochs and not _reached(pos, cfg, ctx, device):
            stage = "contrastive" if pos.epoch < cfg.contrastive_epochs else "density"
            weights = _stage_weights(stage, cfg)
            loader = _epoch_loader(dataset, cfg, ctx, pos, local_batch, device)
            for batch in loader:
                total, contrastive, mse = _train_step(runner, optimizer, batch, weights, device, pos)
                if average is not None:
                    average.update()
                result.losses.append(total)
                pos.step += 1
                pos.seconds = clock.seconds()
                pos.batch += 1
                lr = optimizer.param_groups[0]["lr"]
                if pos.batch == batches_per_epoch:
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                    scheduler.step()
                logger.step(pos, stage, total, contrastive, mse, lr, cfg.log_every, device)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(stage=stage, epoch=pos.epoch, loss=f"{total:.4g}", lr=f"{lr:.2g}")
                if cfg.checkpoint_every > 0 and pos.step % cfg.checkpoint_every == 0:
                    result.last_checkpoint = save_checkpoint(out_dir, LAST, model, optimizer, scheduler, pos, cfg,
                                                             ctx, average)
                    last_saved = pos.step
                if _reached(pos, cfg, ctx, device):
                    break
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    if last_saved != pos.step:
        result.last_checkpoint = save_checkpoint(out_dir, LAST, model, optimizer, scheduler, pos, cfg, ctx, average)
    with average.applied() if average is not None else nullcontext():
        result.final_checkpoint = save_checkpoint(out_dir, FINAL, model, None, None, pos, cfg, ctx)
    result.step, result.epoch = pos.step, pos.epoch
    result.finished = pos.epoch >= total_epochs
    result.seconds = time.time() - started
    return result


def _train_step(runner: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any],
                weights: tuple[float, float], device: torch.device, pos: Position) -> tuple[float, float, float]:
    images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
    density = batch["density"].to(device, non_blocking=True)  # (B, 1, S, S)
    optimizer.zero_grad(set_to_none=True)  # unused parameters keep grad None, so AdamW skips them
    prompts = batch["prompts"] if "prompts" in batch else batch["prompt"]
    total, contrastive, mse = runner(images, density, prompts, *weights)
    if not torch.isfinite(total):
        raise TrainingError(
            f"the training loss became {total.item()} at step {pos.step + 1} (epoch {pos.epoch}); lower the "
            "learning rate or use precision fp32, and resume from the last checkpoint"
        )
    total.backward()
    optimizer.step()
    return float(total.item()), float(contrastive.item()), float(mse.item())


def _stage_weights(stage: str, cfg: TrainConfig) -> tuple[float, float]:
    """(contrastive weight, density weight) of a stage."""
    if stage == "contrastive":
        return float(cfg.contrastive_weight), 0.0
    return float(cfg.contrastive_weight_stage2), 1.0


def _check_limits(cfg: TrainConfig) -> None:
    """Settings checked before anything is written."""
    if cfg.ema_decay != 0 and not 0 < cfg.ema_decay < 1:
        raise ConfigError(f"ema_decay must be in (0, 1) (e.g. 0.998), or 0 for no average, not {cfg.ema_decay}")
    if cfg.empty_count_weight < 0 or cfg.count_weight < 0:
        raise ConfigError("count_weight and empty_count_weight must be at least 0, not "
                          f"{cfg.count_weight} and {cfg.empty_count_weight}")
    if cfg.max_seconds is not None and cfg.max_seconds <= 0:
        raise ConfigError(f"max_seconds must be positive, not {cfg.max_seconds}")


def _reached(pos: Position, cfg: TrainConfig, ctx: DistContext, device: torch.device) -> bool:
    """max_steps or max_seconds reached. Every process must call it at the same points: with a time
    limit the processes take rank 0's clock, so they all stop after the same step."""
    if cfg.max_steps is not None and pos.step >= cfg.max_steps:
        return True
    if cfg.max_seconds is None:
        return False
    return rank0_decides(ctx, pos.seconds >= cfg.max_seconds, device)


@dataclass
class _Clock:
    """Seconds of training in all: those of earlier calls (`before`) plus this call's."""

    before: float
    started: float = field(default_factory=time.monotonic)

    def seconds(self) -> float:
        return self.before + time.monotonic() - self.started


def _local_batch(batch_size: int, world_size: int) -> int:
    if batch_size < 1 or batch_size % world_size:
        raise ConfigError(
            f"batch size {batch_size} must be a positive multiple of the {world_size} training processes "
            "(it is the global batch, split evenly between them)"
        )
    return batch_size // world_size


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA under "auto"; fp32 on CPU unless bf16 is asked for."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ConfigError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")


def _resolve_context(distributed: DistContext | bool | None) -> DistContext:
    if isinstance(distributed, DistContext):
        return distributed
    if distributed is False:
        return DistContext()
    current = current_context()
    if current.enabled:
        return current
    if env_context().enabled:
        return init_from_env()
    return DistContext()


# ---- data ---------------------------------------------------------------------------------------

def _sampler(dataset, cfg: TrainConfig, ctx: DistContext, epoch: int):
    """The epoch's shuffled indices for this process: a function of (seed, epoch, rank) only."""
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return sampler


def _epoch_loader(dataset, cfg: TrainConfig, ctx: DistContext, pos: Position, local_batch: int,
                  device: torch.device) -> torch.utils.data.DataLoader:
    """The rest of epoch `pos.epoch`: its batches after the first `pos.batch`, in the same order."""
    from clipcount.data import collate

    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(pos.epoch)  # before the workers copy the dataset
    indices = list(_sampler(dataset, cfg, ctx, pos.epoch))[pos.batch * local_batch:]
    # Our own generator: the DataLoader draws its worker base seed from it instead of from the
    # global RNG, which would otherwise shift the dropout stream differently in a resumed run.
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + pos.epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=indices, num_workers=cfg.num_workers, collate_fn=collate,
        worker_init_fn=seed_worker, generator=generator, drop_last=False, pin_memory=device.type == "cuda",
    )


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a DataLoader worker from its torch seed (distinct per worker)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _progress_bar(enabled: bool, pos: Position, cfg: TrainConfig, total_epochs: int, batches_per_epoch: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = total_epochs * batches_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    return tqdm(total=total, initial=min(pos.step, total), desc="train", unit="step", dynamic_ncols=True)
