"""Contrastive pretraining of a small CLIP on the synthetic world, so the whole method can be
trained and measured without downloading anything.

The model is clipcount's own `CLIP` (the towers CLIP-Count freezes), only smaller. It learns from
(crop, caption) pairs of `CaptionStream`: 384x384 crops of training scenes, each captioned with the
classes and rough counts inside it ("a few red circles and 12 blue squares"). Held-out classes never
appear in a pixel or a caption. The loss is CLIP's symmetric InfoNCE over the batch with a learnable
temperature (logit scale capped at 100, as in CLIP).

Images are resized to `vision.image_size` and normalised exactly as `ClipCount.preprocess` does, so
the towers see at pretraining what they see inside CLIP-Count.

Output folder:
    last/    clip.safetensors + clip_config.json + trainer_state.{safetensors,json} (resumable)
    final/   clip.safetensors + clip_config.json, written when every step is done
    metrics.jsonl  loss, in-batch retrieval accuracy, logit scale, learning rate
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipcount.config import CLIP_MEAN, CLIP_STD, CLIPConfig, TextConfig, VisionConfig
from clipcount.errors import CheckpointError, ClipCountError, ConfigError
from clipcount.modeling.clip import CLIP
from clipcount.synthetic.stream import CaptionStream, collate_captions
from clipcount.synthetic.world import WorldConfig

CLIP_WEIGHTS = "clip.safetensors"
CLIP_CONFIG = "clip_config.json"
LAST, FINAL = "last", "final"
METRICS = "metrics.jsonl"
STEM_REPORT = "stem.json"  # what stage 0 reached (stem.pretrain_stem's result)
MAX_LOGIT_SCALE = math.log(100.0)


class PretrainError(ClipCountError, RuntimeError):
    """Pretraining cannot go on (the loss became NaN or infinite)."""


@dataclass
class PretrainConfig:
    """Optimisation of CLIP pretraining: AdamW, linear warm-up then cosine decay to `final_lr_ratio`.

    With `time_budget_s`, `steps` is an upper bound: the step rate is measured over the first
    `calibration_steps` steps, after the first third of them (inside the warm-up, whose learning
    rates do not depend on the total)
    and the run is sized to end within the budget. The chosen number is saved with the checkpoint,
    so a resumed run keeps it.
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 5e-4
    final_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    crop_size: int = 384
    crops_per_scene: int = 2
    num_workers: int = 2
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    checkpoint_every: int = 500
    log_every: int = 20
    world: dict[str, Any] = field(default_factory=dict)  # WorldConfig overrides (mode is always "train")
    time_budget_s: float | None = None  # size `steps` to this many seconds of training (see above)
    calibration_steps: int = 25
    # Weight of the region-level loss (`regions.py`: every patch classified against class, shape
    # and colour texts by what covers it) beside the caption loss; 0 = captions only.
    region_weight: float = 0.0
    # Stage 0 (`stem.py`, needs VisionConfig(stem="conv" or "hybrid")): the stem learns shape and colour from
    # object crops for at most `stem_steps` steps / `stem_time_budget_s` seconds (on top of
    # `time_budget_s`), then stays frozen. 0 = no stage 0 (the stem trains with the rest).
    stem_steps: int = 0
    stem_time_budget_s: float | None = None
    # Stage 0 is bound by drawing scenes, not by its small conv net (on one core: 0.17 s for a
    # batch's scenes, 0.05 s for its step), so it gets data workers of its own and, when set, this
    # many threads in the main process (measured on 2 cores: 3 workers and 1 thread, 10.5 steps/s;
    # 1 worker and 2 threads, 5.5: the idle main threads spin against the workers). None = as above.
    stem_workers: int | None = None
    stem_threads: int | None = None

    def world_config(self) -> WorldConfig:
        return WorldConfig(**{**self.world, "mode": "train"})


@dataclass
class PretrainResult:
    out_dir: Path
    step: int
    finished: bool
    final: Path | None
    seconds: float
    last_loss: float = math.nan
    last_accuracy: float = math.nan


# ---- files --------------------------------------------------------------------------------------

def clip_config_to_dict(cfg: CLIPConfig) -> dict[str, Any]:
    return asdict(cfg)


def clip_config_from_dict(data: dict[str, Any]) -> CLIPConfig:
    return CLIPConfig(
        vision=VisionConfig(**data["vision"]),
        text=TextConfig(**data["text"]),
        embed_dim=data["embed_dim"],
        activation=data.get("activation", "quick_gelu"),
    )


def save_clip(clip: CLIP, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Weights (OpenAI layout, the `CLIP` module's state dict) and architecture into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in clip.state_dict().items()}
    save_file(state, str(folder / CLIP_WEIGHTS), metadata={"format": "pt"})
    payload = {"clip": clip_config_to_dict(clip.cfg), **(extra or {})}
    (folder / CLIP_CONFIG).write_text(json.dumps(payload, indent=2), encoding="utf-8")


def read_clip(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """The state dict and config `save_clip` wrote (folder = a pretraining run's final/ or last/,
    or the run folder itself, meaning its final/)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CLIP_WEIGHTS).is_file() and (folder / FINAL / CLIP_WEIGHTS).is_file():
        folder = folder / FINAL
    weights, config = folder / CLIP_WEIGHTS, folder / CLIP_CONFIG
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(
            f"{folder} holds no pretrained synthetic CLIP ({CLIP_WEIGHTS} + {CLIP_CONFIG}); "
            "run `clipcount synthetic pretrain-clip OUT` first"
        )
    try:
        cfg = clip_config_from_dict(json.loads(config.read_text(encoding="utf-8"))["clip"])
        state = load_file(str(weights))
    except Exception as error:  # noqa: BLE001 - json, safetensors and dataclass errors vary
        raise CheckpointError(f"{folder} holds an unreadable CLIP checkpoint ({error})") from None
    return state, cfg


def load_clip(folder: str | os.PathLike, device: str | torch.device = "cpu") -> CLIP:
    from clipcount.modeling.weights import load_state_strict

    state, cfg = read_clip(folder)
    clip = CLIP(cfg)
    load_state_strict(clip, state, str(folder))
    return clip.to(device).eval()


def _save_checkpoint(out_dir: Path, name: str, clip: CLIP, optimizer, step: int, cfg: PretrainConfig) -> Path:
    from clipcount.engine.run_folder import swap_in
    from clipcount.engine.trainer_state import save_trainer_state

    tmp = out_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_clip(clip, tmp, extra={"pretraining": {"step": step, "config": asdict(cfg)}})
    if optimizer is not None:
        save_trainer_state(tmp, {"step": step, "optimizer": optimizer.state_dict(), "config": asdict(cfg)})
    swap_in(tmp, out_dir / name)  # renames only: a kill never leaves half a checkpoint
    return out_dir / name


def _find_last(out_dir: Path) -> Path | None:
    for folder in (out_dir / LAST, out_dir / f".{LAST}.old"):
        if (folder / CLIP_WEIGHTS).is_file():
            return folder
    return None


# ---- the model's view of an image ---------------------------------------------------------------

def preprocess(images: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Images (B, 3, H, W), uint8 or float in [0, 1] -> CLIP input (B, 3, size, size), resized and
    normalised as `ClipCount.preprocess` does."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: logits (B, B) with matching pairs on the diagonal -> scalar."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target))


# ---- training -----------------------------------------------------------------------------------

def _param_groups(clip: CLIP, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, embeddings or the temperature."""
    decay, plain = [], []
    for name, param in clip.named_parameters():
        no_decay = param.ndim < 2 or "embedding" in name or name.endswith("logit_scale")
        (plain if no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from lr to lr * final_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.final_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast for "bf16", and for "auto" on CUDA; float32 otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
    return contextlib.nullcontext()


def _loader(cfg: PretrainConfig, clip_cfg: CLIPConfig, start: int, device: torch.device):
    """Batches start..steps-1: batch b holds items b*B .. (b+1)*B - 1 of the caption stream."""
    stream = CaptionStream(
        cfg.steps * cfg.batch_size, clip_cfg.text.context_length, seed=cfg.seed, world=cfg.world_config(),
        crop_size=cfg.crop_size, crops_per_scene=cfg.crops_per_scene,
        patch_grid=clip_cfg.vision.grid_size if cfg.region_weight > 0 else None,
    )
    indices = range(start * cfg.batch_size, cfg.steps * cfg.batch_size)
    return torch.utils.data.DataLoader(
        stream, batch_size=cfg.batch_size, sampler=indices, num_workers=cfg.num_workers,
        collate_fn=collate_captions, pin_memory=device.type == "cuda", drop_last=False,
        prefetch_factor=4 if cfg.num_workers > 0 else None, persistent_workers=False,
    )


def pretrain_clip(
    clip_cfg: CLIPConfig,
    cfg: PretrainConfig,
    out_dir: str | os.PathLike,
    resume: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a CLIP of architecture `clip_cfg` on the synthetic world; see the module docstring.

    `resume=True` continues from out_dir/last when it exists. Interrupting (Ctrl-C) saves
    out_dir/last first, so the next call picks up at that step.
    """
    from clipcount.engine.inference import pick_device

    started = time.time()
    device = pick_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume and (out_dir / FINAL / CLIP_WEIGHTS).is_file():
        return PretrainResult(out_dir, cfg.steps, True, out_dir / FINAL, 0.0)
    torch.manual_seed(cfg.seed)
    clip = CLIP(clip_cfg).to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(clip, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    step, chosen = _resume(out_dir, clip, optimizer, device, progress) if resume else (0, None)
    if cfg.stem_steps > 0:
        if _find_last(out_dir) is None or not resume:  # stage 0 runs once; a resumed run has its stem
            _stage_zero(clip, cfg, out_dir, optimizer, device, progress)
        from clipcount.synthetic.stem import freeze_stem

        freeze_stem(clip)
    budget = _Budget(cfg, step) if cfg.time_budget_s and chosen is None else None
    if chosen is not None:  # a resumed timed run keeps the length it chose
        cfg = dataclasses.replace(cfg, steps=chosen, time_budget_s=None)

    metrics = _open_metrics(out_dir / METRICS, step)
    bar = _bar(progress, step, cfg.steps)
    result = PretrainResult(out_dir, step, False, None, 0.0)
    window: list[tuple[float, float]] = []
    try:
        region = _region_texts(clip_cfg, device) if cfg.region_weight > 0 else None
        for batch in _loader(cfg, clip_cfg, step, device):
            if step >= cfg.steps:  # a timed run chose fewer steps than the loader holds
                break
            if budget is not None and budget.ready(step):
                cfg = dataclasses.replace(cfg, steps=budget.choose(step), time_budget_s=None)
                budget = None
                if bar is not None:
                    bar.total = cfg.steps
                    bar.refresh()
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, accuracy = _step(clip, optimizer, batch, device, cfg, step, region)
            step += 1
            window.append((loss, accuracy))
            result.last_loss, result.last_accuracy = loss, accuracy
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                _log(metrics, step, window, lr, clip, started)
                window.clear()
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_checkpoint(out_dir, LAST, clip, optimizer, step, cfg)
    except KeyboardInterrupt:
        _save_checkpoint(out_dir, LAST, clip, optimizer, step, cfg)
        raise
    finally:
        metrics.close()
        if bar is not None:
            bar.close()
    _save_checkpoint(out_dir, LAST, clip, optimizer, step, cfg)
    result.final = _save_checkpoint(out_dir, FINAL, clip, None, step, cfg)
    result.step, result.finished, result.seconds = step, True, time.time() - started
    return result


def _stage_zero(clip: CLIP, cfg: PretrainConfig, out_dir: Path, optimizer, device: torch.device,
                progress: bool) -> None:
    """Stage 0 (object crops, `stem.py`), then a step-0 checkpoint so an interruption later never
    repeats it; what it reached goes to out_dir/STEM_REPORT."""
    from clipcount.synthetic.stem import StemPretrainConfig, pretrain_stem

    stem_cfg = StemPretrainConfig(steps=cfg.stem_steps, time_budget_s=cfg.stem_time_budget_s, window=cfg.crop_size,
                                  precision=cfg.precision)
    workers = cfg.num_workers if cfg.stem_workers is None else cfg.stem_workers
    result = pretrain_stem(clip, stem_cfg, cfg.world_config(), seed=cfg.seed, num_workers=workers,
                           device=device, progress=progress, threads=cfg.stem_threads)
    (out_dir / STEM_REPORT).write_text(json.dumps(result, indent=2), encoding="utf-8")
    _save_checkpoint(out_dir, LAST, clip, optimizer, 0, cfg)


class _Budget:
    """Sizes a timed pretraining run from the step rate measured after the first few steps."""

    def __init__(self, cfg: PretrainConfig, start: int):
        self.cfg = cfg
        self.started = time.time()
        # Skip the first third: every worker delivers its first batch at about the same moment, and
        # timing that burst would overestimate the steady rate (by 2x in the first GPU run).
        self.first = start + max(1, cfg.calibration_steps // 3)
        self.last = start + max(cfg.calibration_steps, self.first - start + 2)
        self.t_first: float | None = None

    def ready(self, step: int) -> bool:
        if step == self.first:
            self.t_first = time.time()
        return step >= self.last and self.t_first is not None

    def choose(self, step: int) -> int:
        now = time.time()
        rate = (step - self.first) / max(now - self.t_first, 1e-6)  # steps per second
        remaining = self.cfg.time_budget_s - (now - self.started)
        return int(min(self.cfg.steps, max(step + 1, step + rate * remaining)))


def _region_texts(clip_cfg: CLIPConfig, device: torch.device):
    """The region loss's texts, tokenised once: (RegionTexts, token ids (T, L))."""
    from clipcount.modeling.tokenizer import ClipTokenizer
    from clipcount.synthetic.regions import RegionTexts

    texts = RegionTexts.build()
    return texts, ClipTokenizer()(list(texts.texts), context_length=clip_cfg.text.context_length).to(device)


def _step(clip: CLIP, optimizer, batch: dict[str, Any], device: torch.device, cfg: PretrainConfig,
          step: int, region=None) -> tuple[float, float]:
    from clipcount.synthetic.regions import region_loss

    images = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S) uint8
    tokens = batch["tokens"].to(device, non_blocking=True)  # (B, L)
    with autocast_for(device, cfg.precision):
        pixels = preprocess(images, clip.cfg.vision.image_size)
        all_tokens = clip.visual.tokens(pixels)  # (B, 1 + N, width): one pass for both losses
        image_features = clip.visual.ln_post(all_tokens[:, 0]) @ clip.visual.proj  # (B, E)
        text_features = clip.encode_text(tokens)  # (B, E)
    # logits in fp32: at a logit scale near 100, bf16 would round them to steps of 0.5
    image_features = F.normalize(image_features.float(), dim=-1)
    text_features = F.normalize(text_features.float(), dim=-1)
    logits = clip.logit_scale.exp() * image_features @ text_features.t()  # (B, B)
    loss = contrastive_loss(logits)
    if region is not None:
        texts, text_tokens = region
        fractions = batch["class_fractions"].to(device, non_blocking=True)  # (B, N, 1 + C)
        with autocast_for(device, cfg.precision):
            loss = loss + cfg.region_weight * region_loss(clip, all_tokens, fractions, text_tokens, texts)
    if not torch.isfinite(loss):
        raise PretrainError(
            f"the CLIP pretraining loss became {loss.item()} at step {step + 1}; lower the learning rate "
            "or use precision fp32, and resume from the last checkpoint"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        clip.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        target = torch.arange(logits.shape[0], device=logits.device)
        accuracy = (logits.argmax(dim=1) == target).float().mean()
    return float(loss.item()), float(accuracy.item())


def _resume(out_dir: Path, clip: CLIP, optimizer, device: torch.device, progress: bool) -> tuple[int, int | None]:
    """(step, the total a timed run chose or None) from out_dir/last; (0, None) when there is none."""
    from safetensors.torch import load_file

    from clipcount.engine.trainer_state import load_trainer_state
    from clipcount.modeling.weights import load_state_strict

    folder = _find_last(out_dir)
    if folder is None:
        return 0, None
    state = load_trainer_state(folder)
    load_state_strict(clip, load_file(str(folder / CLIP_WEIGHTS), device=str(device)), str(folder))
    optimizer.load_state_dict(state["optimizer"])
    if progress:
        print(f"clipcount: resuming CLIP pretraining from {folder} at step {state['step']}", flush=True)
    saved = state.get("config") or {}
    chosen = int(saved["steps"]) if saved.get("time_budget_s") is None and "steps" in saved else None
    return int(state["step"]), chosen


def _open_metrics(path: Path, step: int):
    """metrics.jsonl for writing, keeping the lines up to `step` (a resumed run drops what the
    interrupted one logged after its last checkpoint)."""
    kept = []
    if step and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the interruption
    handle = open(path, "w", encoding="utf-8")
    handle.writelines(kept)
    return handle


def _log(handle, step: int, window: list[tuple[float, float]], lr: float, clip: CLIP, started: float) -> None:
    if not window:
        return
    loss, accuracy = (float(np.mean(v)) for v in zip(*window))
    record = {"step": step, "loss": loss, "accuracy": accuracy, "lr": lr,
              "logit_scale": float(clip.logit_scale.exp().item()), "time": round(time.time() - started, 2)}
    handle.write(json.dumps(record) + "\n")
    handle.flush()


def _bar(enabled: bool, step: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc="pretrain CLIP", unit="step", dynamic_ncols=True)


# ---- a check of what was learned ----------------------------------------------------------------

@torch.inference_mode()
def zero_shot_accuracy(clip: CLIP, n: int = 120, seed: int = 20_000_000, device: str | torch.device = "cpu",
                       crop_size: int = 384) -> dict[str, float]:
    """Classify single-class test scenes among all 36 "<colour> <shape>" classes, held-out ones
    included. Returns top-1 accuracy on seen and on held-out classes (chance: 1/36).

    Held-out accuracy says whether the text tower composes a colour and a shape it never saw
    together, which zero-shot counting depends on.
    """
    from clipcount.modeling.tokenizer import ClipTokenizer
    from clipcount.synthetic.prompts import ALL_CLASSES, HELD_OUT, TRAIN_CLASSES, format_prompt
    from clipcount.synthetic.world import make_scene, sample_count

    clip = clip.to(device).eval()
    tokenizer = ClipTokenizer()
    texts = [f"some {format_prompt(c, s)}" for c, s in ALL_CLASSES]
    text = F.normalize(clip.encode_text(tokenizer(texts, clip.cfg.text.context_length).to(device)).float(), dim=-1)
    world = WorldConfig(mode="test", height=crop_size, min_width=crop_size, max_width=crop_size,
                        max_size=min(60.0, crop_size / 4))
    hits = {"seen": [], "held_out": []}
    held_out, seen = sorted(HELD_OUT), list(TRAIN_CLASSES)
    for i in range(max(2, n)):  # alternately a held-out and a seen class
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        pool = held_out if i % 2 == 0 else seen
        label = ALL_CLASSES.index(pool[int(rng.integers(len(pool)))])
        scene = make_scene(rng, world, {ALL_CLASSES[label]: sample_count(rng, 1, 40)})
        image = torch.from_numpy(scene.image.transpose(2, 0, 1).copy())[None].to(device)  # (1, 3, S, S)
        feature = F.normalize(clip.encode_image(preprocess(image, clip.cfg.vision.image_size)).float(), dim=-1)
        guess = int((feature @ text.t()).argmax())
        hits["held_out" if ALL_CLASSES[label] in HELD_OUT else "seen"].append(guess == label)
    return {key: float(np.mean(v)) if v else math.nan for key, v in hits.items()}


__all__ = [
    "CLIP_CONFIG",
    "CLIP_WEIGHTS",
    "PretrainConfig",
    "PretrainError",
    "PretrainResult",
    "STEM_REPORT",
    "contrastive_loss",
    "learning_rate",
    "load_clip",
    "preprocess",
    "pretrain_clip",
    "read_clip",
    "save_clip",
    "zero_shot_accuracy",
]
