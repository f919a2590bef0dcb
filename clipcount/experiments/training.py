"""The models the experiments compare: one pretrained CLIP, and CLIP-Count variants trained on it.

Both are cached under the run context's cache folder, keyed by a hash of the settings that decide
their weights (architecture, training settings, data, seeds), so experiments that share a variant
(the paper's configuration is a row of four of them) train it once:

    CACHE/clip-<key>/final/          the synthetic CLIP (clipcount.synthetic.pretrain's layout)
    CACHE/models/<label>-<key>/      train()'s run folder: final/ is the model, info.json the
                                     training facts (seconds, steps, parameter counts)

A variant is the paper's configuration plus a few changed settings ("interaction.scales": 3),
so its report shows exactly what differs. The cache key holds the settings chosen here (budget,
variant changes, seed, data, CLIP), not every field of the config dataclasses, so a field added
elsewhere with a default does not throw the cache away.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipcount.config import ClipCountConfig, DecoderConfig, InteractionConfig, PromptConfig, TrainConfig
from clipcount.engine.head_init import HEAD_INIT_FRACTION, start_density_head
from clipcount.errors import CheckpointError, ConfigError
from clipcount.experiments.common import RunContext
from clipcount.modeling.clip_count import ClipCount

INFO_FILE = "info.json"


@dataclass
class Variant:
    """The paper's configuration with `model` and `train` settings changed (dotted names)."""

    label: str
    model: dict[str, Any] = field(default_factory=dict)  # e.g. {"interaction.scales": 1}
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields, e.g. {"contrastive_epochs": 0}
    description: str = ""


@dataclass
class TrainedModel:
    label: str
    model: ClipCount
    seconds: float  # training wall time (measured when it was trained, also if loaded from the cache)
    steps: int
    trainable: int  # trainable parameters
    total: int  # all parameters
    folder: Path | None
    cached: bool
    cpu_seconds: float = float("nan")  # CPU time of the training process (data workers not included)


# ---- the CLIP -----------------------------------------------------------------------------------

def is_synthetic_clip(source: str | Path) -> bool:
    from clipcount.synthetic.pretrain import CLIP_WEIGHTS, FINAL

    path = Path(source)
    return (path / CLIP_WEIGHTS).is_file() or (path / FINAL / CLIP_WEIGHTS).is_file()


def clip_source(ctx: RunContext) -> str:
    """The CLIP the variants are built on: --clip as given, else the cached synthetic CLIP
    (pretrained now if it is not there yet)."""
    if ctx.clip is not None:
        return str(ctx.clip)
    return str(pretrained_clip(ctx))


def pretrained_clip(ctx: RunContext) -> Path:
    """The budget's synthetic CLIP, pretrained once per (budget, seed) and cached."""
    from clipcount.config import CLIPConfig, TextConfig, VisionConfig
    from clipcount.synthetic.pretrain import CLIP_WEIGHTS, FINAL, PretrainConfig, pretrain_clip

    budget = ctx.budget
    clip_cfg = CLIPConfig(VisionConfig(**budget.vision), TextConfig(**budget.text), budget.embed_dim)
    cfg = PretrainConfig(
        steps=budget.pretrain_steps, batch_size=budget.pretrain_batch, lr=budget.pretrain_lr,
        warmup_steps=max(1, min(100, budget.pretrain_steps // 10)), crop_size=budget.window,
        crops_per_scene=2, num_workers=budget.workers, seed=ctx.seed, checkpoint_every=0,
        world=dict(budget.world), region_weight=budget.region_weight,
    )
    pretraining = [cfg.steps, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.crop_size, cfg.crops_per_scene]
    if cfg.region_weight:
        pretraining.append({"region_weight": cfg.region_weight})
    key = _hash({"vision": budget.vision, "text": budget.text, "embed_dim": budget.embed_dim, "world": budget.world,
                 "pretrain": pretraining, "seed": ctx.seed})
    folder = ctx.cache / f"clip-{budget.name}-{key}"
    if (folder / FINAL / CLIP_WEIGHTS).is_file():
        ctx.log(f"using the cached synthetic CLIP {folder}")
        note_pretraining(ctx, folder, cfg)
        return folder / FINAL
    ctx.log(f"pretraining the synthetic CLIP ({budget.pretrain_steps} steps of {budget.pretrain_batch}) into {folder}")
    started = time.time()
    result = pretrain_clip(clip_cfg, cfg, folder, resume=True, device=ctx.device, progress=ctx.progress)
    ctx.log(f"CLIP pretrained in {time.time() - started:.0f} s (last batch loss {result.last_loss:.3f}, "
            f"in-batch accuracy {result.last_accuracy:.2f})")
    note_pretraining(ctx, folder, cfg)
    return folder / FINAL


def note_pretraining(ctx: RunContext, folder: Path, cfg) -> None:
    """Put the CLIP pretraining's last logged loss and in-batch accuracy in the report's notes."""
    from clipcount.synthetic.pretrain import METRICS

    lines = (folder / METRICS).read_text(encoding="utf-8").splitlines() if (folder / METRICS).is_file() else []
    if not lines:
        return
    last = json.loads(lines[-1])
    note = (f"synthetic CLIP pretrained {last.get('step')} steps of {cfg.batch_size} in {last.get('time', 0):.0f} s: "
            f"last logged loss {last.get('loss', float('nan')):.3f}, in-batch image-to-caption accuracy "
            f"{last.get('accuracy', float('nan')):.2f} (chance {1 / cfg.batch_size:.2f})")
    if note not in ctx.notes:
        ctx.notes.append(note)


# ---- CLIP-Count configurations ------------------------------------------------------------------

def base_config(ctx: RunContext, synthetic_clip: bool) -> ClipCountConfig:
    """The paper's structure at the budget's size. With real CLIP weights, the published sizes."""
    budget = ctx.budget
    if not synthetic_clip:
        return ClipCountConfig()  # the published sizes and protocol (384-pixel windows)
    return ClipCountConfig(
        prompts=PromptConfig(visual_tokens=budget.visual_tokens, visual_layers=budget.deep_layers,
                             text_context_tokens=2),
        interaction=InteractionConfig(scales=2, width=budget.interaction_width, heads=budget.interaction_heads),
        decoder=DecoderConfig(channels=tuple(budget.decoder_channels), groups=budget.decoder_groups),
        window_size=budget.window,
    )


def apply_changes(config: ClipCountConfig, changes: dict[str, Any]) -> ClipCountConfig:
    """A copy of `config` with dotted settings replaced ("interaction.scales": 3)."""
    data = config.to_dict()
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for name in parents:
            if not isinstance(node.get(name), dict):
                raise ConfigError(f"unknown model setting {dotted!r}")
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"unknown model setting {dotted!r}")
        node[leaf] = value
    return ClipCountConfig.from_dict(data)


def train_config(ctx: RunContext, changes: dict[str, Any]) -> TrainConfig:
    """The budget's training settings (no learning-rate decay inside so short a run)."""
    budget = ctx.budget
    cfg = TrainConfig(
        contrastive_epochs=budget.contrastive_epochs, density_epochs=budget.density_epochs,
        batch_size=budget.batch_size, lr=budget.lr, lr_decay_every=10**6, num_workers=budget.workers,
        density_sigma=budget.density_sigma, prompts_per_image=budget.prompts_per_image,
        negative_share=budget.negative_share, hard_negative_share=budget.hard_negative_share,
        checkpoint_every=0, log_every=max(1, budget.epoch_steps // 2), seed=ctx.seed,
    )
    unknown = set(changes) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training settings {sorted(unknown)}")
    return dataclasses.replace(cfg, **changes)


def build(ctx: RunContext, variant: Variant, clip: str) -> ClipCount:
    """A fresh (untrained) model of `variant` on the CLIP at `clip`, seeded."""
    from clipcount.modeling.weights import load_state_strict

    synthetic = is_synthetic_clip(clip)
    config = apply_changes(base_config(ctx, synthetic), variant.model)
    torch.manual_seed(ctx.seed)
    if synthetic:
        from clipcount.synthetic.pretrain import read_clip

        state, config.clip = read_clip(clip)
        model = ClipCount(config)
        load_state_strict(model.clip, state, str(clip))
        return model
    from clipcount.modeling.build import build_model

    return build_model(config, clip_weights=clip)


# ---- training with a cache ----------------------------------------------------------------------

def trained(ctx: RunContext, variant: Variant) -> TrainedModel:
    """The variant trained on the context's data at its budget, from the cache when possible."""
    from clipcount.modeling.checkpoint import load_model

    clip = clip_source(ctx)
    cfg = train_config(ctx, variant.train)
    key = model_key(ctx, variant, clip)
    folder = ctx.cache / "models" / f"{variant.label}-{key}"
    info_path = folder / INFO_FILE
    if info_path.is_file() and (folder / "final").is_dir():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        try:
            loaded = load_model(folder / "final")
        except CheckpointError:
            loaded = None
        if loaded is not None:
            ctx.log(f"variant {variant.label!r}: using the cached model {folder}")
            result = TrainedModel(variant.label, loaded, info["seconds"], info["steps"], info["trainable"],
                                  info["total"], folder, True, info.get("cpu_seconds", float("nan")))
            record_variant(ctx, variant, result, cfg)
            return result
    ctx.log(f"variant {variant.label!r}: training {cfg.contrastive_epochs}+{cfg.density_epochs} epochs of "
            f"{ctx.budget.epoch_steps} steps (batch {cfg.batch_size}) into {folder}")
    from clipcount.engine.train import train

    model = build(ctx, variant, clip)
    data = training_data(ctx, cfg, model.config.window_size)
    start_density_head(model, data)  # a short run cannot afford to unlearn the default start (head_init.py)
    cpu_started = time.process_time()  # this process's CPU time: a cost measure that shared cores do not skew
    run = train(model, data, cfg, folder, device=ctx.device, distributed=False, progress=ctx.progress)
    model.eval()
    info = {"label": variant.label, "seconds": round(run.seconds, 2), "steps": run.step,
            "trainable": model.num_trainable_parameters(), "total": sum(p.numel() for p in model.parameters()),
            "final_loss": run.losses[-1] if run.losses else None,
            "cpu_seconds": round(time.process_time() - cpu_started, 2)}
    from clipcount.engine.metrics import write_json_atomic

    write_json_atomic(info, info_path)
    ctx.log(f"variant {variant.label!r}: {run.step} steps in {run.seconds:.0f} s, last loss {info['final_loss']}")
    result = TrainedModel(variant.label, model, info["seconds"], run.step, info["trainable"], info["total"],
                          folder, False, info["cpu_seconds"])
    record_variant(ctx, variant, result, cfg)
    return result


def model_key(ctx: RunContext, variant: Variant, clip: str) -> str:
    """The cache key of a trained variant: the settings this module chooses, not every field of the
    config dataclasses, so that a new field with a default elsewhere does not invalidate the cache."""
    budget = ctx.budget
    sizes = ("visual_tokens", "interaction_width", "interaction_heads", "decoder_channels", "decoder_groups",
             "batch_size", "epoch_steps", "contrastive_epochs", "density_epochs", "lr", "world", "density_sigma",
             "absent_prob", "prompts_per_image", "negative_share", "hard_negative_share", "region_weight")
    return _hash({
        "variant": [variant.model, variant.train], "budget": {k: getattr(budget, k) for k in sizes},
        "deep_layers": budget.deep_layers, "head_init": HEAD_INIT_FRACTION, "seed": ctx.seed, "data": ctx.data,
        "root": str(ctx.root),
        "clip": str(Path(clip).resolve()) if Path(clip).exists() else clip,
    })


def record_variant(ctx: RunContext, variant: Variant, result: TrainedModel, cfg: TrainConfig) -> None:
    ctx.variants[variant.label] = {
        "description": variant.description,
        "changes": {"model": variant.model, "train": variant.train},
        "model_config": result.model.config.to_dict(),
        "train_config": dataclasses.asdict(cfg),
        "train_seconds": result.seconds,
        "train_cpu_seconds": result.cpu_seconds,
        "steps": result.steps,
        "trainable_parameters": result.trainable,
        "cached": result.cached,
        "folder": str(result.folder) if result.folder else None,
    }


def loaded_baseline(ctx: RunContext, label: str = "paper") -> TrainedModel:
    """--model as the baseline, or the paper's configuration trained at the budget.

    A checkpoint of the synthetic recipe records the world it was trained on; its test scenes are
    then drawn from that world (image height, object sizes), not the budget's."""
    if ctx.model is None:
        return trained(ctx, Variant(label, description="the paper's configuration"))
    from clipcount.modeling.checkpoint import load_model, read_config, resolve_checkpoint

    folder = resolve_checkpoint(ctx.model)
    model = load_model(folder).eval()
    ctx.notes.append(f"baseline model loaded from {ctx.model} (not trained by this run)")
    adopt_training_world(ctx, read_config(folder)[1])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = TrainedModel(label, model, float("nan"), 0, trainable, sum(p.numel() for p in model.parameters()),
                          Path(ctx.model), True)
    ctx.variants[label] = {"description": f"loaded from {ctx.model}", "model_config": model.config.to_dict()}
    return result


def adopt_training_world(ctx: RunContext, checkpoint_config: dict[str, Any]) -> None:
    """Use the synthetic world a checkpoint records (config.json "synthetic" -> "world") for test scenes."""
    from clipcount.synthetic.world import WorldConfig

    world = (checkpoint_config.get("synthetic") or {}).get("world")
    if not ctx.synthetic or not isinstance(world, dict):
        return
    full = dataclasses.asdict(WorldConfig(**{**world, "mode": "test"}))
    full.pop("mode")
    ctx.budget = dataclasses.replace(ctx.budget, world=full)
    ctx.notes.append(f"test scenes drawn from the checkpoint's training world ({world or 'the default world'}), "
                     f"{full['height']} pixels high")


def refuse_model(ctx: RunContext) -> None:
    """Experiments that train every arm at one budget cannot take an outside checkpoint for one arm."""
    if ctx.model is not None:
        raise ConfigError(
            f"experiment {ctx.experiment!r} trains each of its variants at the same budget, so --model cannot "
            "stand in for one of them; --model is used by specificity, generalisation and cost"
        )


# ---- data ---------------------------------------------------------------------------------------

class FixedLength(torch.utils.data.Dataset):
    """A dataset seen through a fixed epoch length (index i -> item i mod n), so that training on
    FSC-147 counts its budget in the same steps as the synthetic stream."""

    def __init__(self, base: torch.utils.data.Dataset, length: int):
        self.base, self.length = base, int(length)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.base[index % len(self.base)]


def training_data(ctx: RunContext, cfg: TrainConfig, window: int) -> torch.utils.data.Dataset:
    """Training crops: the synthetic stream (training classes only), or FSC-147's train split."""
    length = ctx.budget.epoch_steps * cfg.batch_size
    if ctx.synthetic:
        from clipcount.synthetic.stream import CountingStream
        from clipcount.synthetic.world import WorldConfig

        world = WorldConfig(**ctx.budget.world, mode="train")
        return CountingStream(length, seed=cfg.seed, world=world, crop_size=window, crops_per_scene=2,
                              density_sigma=cfg.density_sigma, absent_prob=ctx.budget.absent_prob,
                              prompts_per_image=cfg.prompts_per_image, negative_share=cfg.negative_share,
                              hard_negative_share=cfg.hard_negative_share)
    from clipcount.data import TrainingDataset, build_dataset
    from clipcount.data.negatives import WithNegativePrompts

    base = build_dataset("fsc147", ctx.root, "train")
    data = TrainingDataset(base, crop_size=window, density_sigma=cfg.density_sigma, seed=cfg.seed)
    if cfg.prompts_per_image > 1:  # hard negatives need a model's text encoder: plain negatives here
        data = WithNegativePrompts(data, base.prompts, cfg.prompts_per_image, cfg.negative_share, 0.0, seed=cfg.seed)
    return FixedLength(data, length)


def _hash(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
