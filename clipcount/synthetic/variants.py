"""The CLIP-Count models a recipe trains, and how each is trained.

A `Variant` is one training: the main model or an ablation (`ablation_variants` changes one thing
each). `variant_spec` turns it into a JSON-able spec, so `train_variant` runs the same in this
process or in a spawned one (`train_concurrently`, ablations sharing a GPU).
`measure_train_rate` times a throwaway copy, so a time-budgeted preset can choose its step counts
(`recipe.calibrate`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clipcount.config import ClipCountConfig, TrainConfig
from clipcount.engine.head_init import start_density_head
from clipcount.errors import ClipCountError
from clipcount.synthetic.presets import REFERENCE, Preset
from clipcount.synthetic.pretrain import read_clip
from clipcount.synthetic.world import WorldConfig

@dataclass
class Variant:
    """One CLIP-Count training of the recipe: the main model or an ablation."""

    name: str
    model: ClipCountConfig
    train: TrainConfig
    steps_per_epoch: int
    folder: str  # relative to the run folder

    @property
    def total_steps(self) -> int:
        return (self.train.contrastive_epochs + self.train.density_epochs) * self.steps_per_epoch


def main_variant(preset: Preset) -> Variant:
    return Variant("main", copy.deepcopy(preset.model), copy.deepcopy(preset.train), preset.steps_per_epoch, "main")


def ablation_variants(preset: Preset) -> list[Variant]:
    """The preset's ablations (and a full-recipe reference when their budget is not the main model's)."""
    steps = preset.ablation_steps_per_epoch or preset.steps_per_epoch
    base_train = copy.deepcopy(preset.train)
    if preset.ablation_workers is not None:
        base_train.num_workers = preset.ablation_workers
    if not preset.ablations:
        return []
    variants = []
    names = ((REFERENCE,) if steps != preset.steps_per_epoch else ()) + tuple(preset.ablations)
    for name in names:
        model, train = copy.deepcopy(preset.model), copy.deepcopy(base_train)
        if name == "no_contrastive":  # the same number of epochs, all of them density epochs
            train.density_epochs += train.contrastive_epochs
            train.contrastive_epochs = 0
        elif name == "one_scale":
            model.interaction.scales = 1
        elif name == "no_visual_prompts":
            model.prompts.visual_layers = 0
        elif name == "single_prompt":  # the published way: one present class per crop, no negatives
            train.prompts_per_image, train.negative_share = 1, 0.0
        elif name == "no_hard_negatives":
            train.hard_negative_share = 0.0
        variants.append(Variant(name, model, train, steps, f"ablations/{name}"))
    return variants


# ---- building and training one variant ---------------------------------------------------------

def build_on_pretrained(model_cfg: ClipCountConfig, clip_folder: str | os.PathLike):
    """A new ClipCount whose (frozen) CLIP holds the pretrained synthetic CLIP's weights."""
    from clipcount.modeling.clip_count import ClipCount
    from clipcount.modeling.weights import load_state_strict

    state, clip_cfg = read_clip(clip_folder)
    cfg = copy.deepcopy(model_cfg)
    cfg.clip = clip_cfg
    model = ClipCount(cfg)
    load_state_strict(model.clip, state, str(clip_folder))
    model.freeze_clip()
    return model


def synthetic_extra(preset: Preset, variant: str, train_mean: float | None) -> dict[str, Any]:
    """What config.json says about a recipe model under "synthetic" (read by the benchmark)."""
    from clipcount.synthetic.prompts import HELD_OUT, format_prompt

    return {
        "recipe": preset.name,
        "variant": variant,
        "train_mean_count": train_mean,
        "train_seeds": sorted({preset.train.seed, preset.pretrain.seed}),
        "world": preset.world,
        "held_out": sorted(format_prompt(c, s) for c, s in HELD_OUT),
        "trained_on": "synthetic shapes (clipcount's procedural world), not real photos",
    }


def add_extra(folder: Path, extra: dict[str, Any]) -> None:
    """Add the "synthetic" entry to a checkpoint's config.json (replaced atomically)."""
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["synthetic"] = extra
    tmp = path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def train_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one variant (a JSON-able spec, so it also runs in a spawned process); returns a summary."""
    from clipcount.engine.train import FINAL, train
    from clipcount.synthetic.stream import CountingStream

    model_cfg = ClipCountConfig.from_dict(spec["model"])
    train_cfg = _train_config(spec["train"])
    out = Path(spec["out"])
    if (out / FINAL / "config.json").is_file() and spec.get("resume", True):
        done = json.loads((out / FINAL / "config.json").read_text(encoding="utf-8"))
        if done.get("synthetic") and done.get("training", {}).get("step") == spec["total_steps"]:
            return {"name": spec["name"], "skipped": True, "step": spec["total_steps"]}
    fast_gpu_settings()
    torch.manual_seed(train_cfg.seed)
    model = build_on_pretrained(model_cfg, spec["clip"])
    world = WorldConfig(**spec["world"])
    stream = CountingStream(spec["steps_per_epoch"] * train_cfg.batch_size, seed=train_cfg.seed, world=world,
                            crop_size=model_cfg.window_size, crops_per_scene=spec["crops_per_scene"],
                            density_sigma=train_cfg.density_sigma, density_scale=model_cfg.density_scale,
                            absent_prob=spec.get("absent_prob", 0.0), prompts_per_image=train_cfg.prompts_per_image,
                            negative_share=train_cfg.negative_share,
                            hard_negative_share=train_cfg.hard_negative_share,
                            blank_share=train_cfg.background_share)
    # (replaced by the checkpoint's weights when resuming)
    start_density_head(model, stream)
    result = train(model, stream, train_cfg, out, resume=spec.get("resume", True), device=spec.get("device"),
                   distributed=False, progress=spec.get("progress", True))
    add_extra(out / FINAL, spec["extra"])
    return {"name": spec["name"], "step": result.step, "train_seconds": round(result.seconds, 1),
            "trainable_parameters": model.num_trainable_parameters(),
            "final_loss": result.losses[-1] if result.losses else None}


def fast_gpu_settings() -> None:
    """Tuned convolutions (the decoder runs at fixed sizes) and TF32 for what runs outside autocast."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _train_config(data: dict[str, Any]) -> TrainConfig:
    data = dict(data)
    data["betas"] = tuple(data["betas"])
    return TrainConfig(**data)


def variant_spec(variant: Variant, preset: Preset, out_dir: Path, clip_folder: Path, train_mean: float | None,
                 device: str | None, resume: bool, progress: bool) -> dict[str, Any]:
    return {
        "name": variant.name,
        "model": variant.model.to_dict(),
        "train": asdict(variant.train),
        "steps_per_epoch": variant.steps_per_epoch,
        "total_steps": variant.total_steps,
        "crops_per_scene": preset.crops_per_scene,
        "absent_prob": preset.absent_prob,
        "world": {**preset.world, "mode": "train"},
        "clip": str(clip_folder),
        "out": str(out_dir / variant.folder),
        "extra": synthetic_extra(preset, variant.name, train_mean),
        "device": device,
        "resume": resume,
        "progress": progress,
    }


def _train_in_process(spec: dict[str, Any], log_path: str) -> None:
    """Entry point of a spawned ablation process: output to its own log file."""
    with open(log_path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        torch.set_num_threads(1)
        train_variant(spec)


def train_concurrently(specs: list[dict[str, Any]], progress: bool = True) -> list[dict[str, Any]]:
    """Train several variants at once, one spawned process each (they share the GPU); a progress
    bar follows their metrics.jsonl files. Raises naming the log of any process that failed."""
    import multiprocessing

    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")
    processes = []
    for spec in specs:
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        log = str(Path(spec["out"]) / "log.txt")
        process = context.Process(target=_train_in_process, args=({**spec, "progress": False}, log),
                                  name=f"clipcount-{spec['name']}")
        process.start()
        processes.append((spec, process, log))
    total = sum(spec["total_steps"] for spec in specs)
    bar = tqdm(total=total, desc="ablations", unit="step", disable=not progress, dynamic_ncols=True)
    previous = _interrupt_on_sigterm()
    try:
        while any(p.is_alive() for _, p, _ in processes):
            time.sleep(2.0)
            bar.n = sum(_logged_step(Path(s["out"])) for s, _, _ in processes)
            bar.refresh()
    except KeyboardInterrupt:  # the children are not daemons (they need DataLoader workers): stop them
        for _, process, _ in processes:
            process.terminate()
        raise
    finally:
        for _, process, _ in processes:
            process.join()
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    failed = [(spec["name"], log) for spec, process, log in processes if process.exitcode != 0]
    if failed:
        names = ", ".join(f"{name} (see {log})" for name, log in failed)
        raise ClipCountError(f"ablation training failed: {names}; rerun the recipe to resume")
    return [{"name": spec["name"]} for spec in specs]


def _interrupt_on_sigterm():
    """Treat SIGTERM (e.g. from `timeout`) like Ctrl-C while child processes run; returns the old
    handler (None when not in the main thread, where handlers cannot be set)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    try:
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (ValueError, KeyError, IndexError):
        return 0


# ---- sizing training by time ---------------------------------------------------------------------

CALIBRATION_STEPS, CALIBRATION_SKIP = 60, 20  # long enough to see the data workers' steady rate
EPOCH_START_SECONDS = 2.0  # DataLoader workers start again every epoch


def measure_train_rate(spec: dict[str, Any], scratch: Path, stage: str = "density") -> float:
    """Training steps per second of a variant's `stage` ("contrastive" or "density") on this
    machine (data generation included): CALIBRATION_STEPS steps of a throwaway copy, timed after
    the first CALIBRATION_SKIP."""
    if stage not in ("contrastive", "density"):
        raise ValueError(f"stage must be 'contrastive' or 'density', not {stage!r}")
    probe = copy.deepcopy(spec)
    contrastive = stage == "contrastive"
    probe["train"].update(contrastive_epochs=int(contrastive), density_epochs=int(not contrastive),
                          max_steps=CALIBRATION_STEPS, log_every=1, checkpoint_every=0)
    probe.update(steps_per_epoch=4 * CALIBRATION_STEPS, total_steps=CALIBRATION_STEPS, out=str(scratch),
                 resume=False, progress=False)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        train_variant(probe)
        times = {}
        for line in (scratch / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            times[int(record["step"])] = float(record["time"])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    span = times[CALIBRATION_STEPS] - times[CALIBRATION_SKIP]
    return (CALIBRATION_STEPS - CALIBRATION_SKIP) / max(span, 1e-6)


def steps_per_epoch_within(seconds: float, contrastive_epochs: int, density_epochs: int,
                           contrastive_rate: float, density_rate: float) -> int:
    """The most steps per epoch (shared by both stages) whose epochs fit in `seconds`, given each
    stage's steps per second. The contrastive stage skips the decoder and runs ~3x faster than the
    density stage, so sizing every epoch at the density rate would leave its time unused."""
    seconds_per_step_of_each_epoch = (contrastive_epochs / max(contrastive_rate, 1e-9)
                                      + density_epochs / max(density_rate, 1e-9))
    return max(1, int(seconds / max(seconds_per_step_of_each_epoch, 1e-9)))


__all__ = [
    "CALIBRATION_SKIP",
    "CALIBRATION_STEPS",
    "EPOCH_START_SECONDS",
    "Variant",
    "ablation_variants",
    "build_on_pretrained",
    "fast_gpu_settings",
    "main_variant",
    "measure_train_rate",
    "steps_per_epoch_within",
    "synthetic_extra",
    "train_concurrently",
    "train_variant",
    "variant_spec",
]
