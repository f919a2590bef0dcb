"""The whole CLIP-Count method trained and measured on the synthetic world, in one command:

    clipcount synthetic recipe OUT [--preset cpu|full|small|toy]

1. pretrain a small CLIP on the synthetic world (`pretrain.py`): captions of crops, and (preset
   permitting) region-level signal that teaches each patch what covers it (`regions.py`);
2. freeze it and train CLIP-Count on top with the full recipe (deep visual prompts, text context
   tokens, contrastive stage, density stage, hierarchical interaction) with `engine.train.train`
   on scenes generated in DataLoader workers (`stream.py`), several prompts per crop: present
   classes each with their own map, absent and one-attribute-off classes with zero targets
   (`variants.py` builds and trains each model);
3. train ablations with one shared budget (the preset lists them; when their budget is smaller
   than the main model's, the full recipe is trained at it too, "full_same_budget", so every
   ablation has a like-for-like reference);
4. count fresh test scenes with the main model and the ablations (`benchmark.py`) and write
   OUT/report.json and OUT/report.txt.

Every stage is resumable: run the same command again after an interruption and finished stages are
skipped, unfinished trainings continue from their last checkpoint. OUT/recipe.json records the
preset, each stage's time and the numbers later stages need (the training-mean count, and the step
counts a time-budgeted preset chose from the throughput it measured). Presets: `presets.py`.

`export.export_demo(run_dir, assets_dir)` copies the trained model into the package.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from clipcount.errors import CheckpointError, ConfigError
from clipcount.report import json_safe
from clipcount.synthetic.export import export_demo, model_size_mb, render_example
from clipcount.synthetic.presets import (
    ABLATIONS,
    PRESETS,
    Preset,
    full_preset,
    get_preset,
    small_preset,
    toy_preset,
)
from clipcount.synthetic.variants import (
    EPOCH_START_SECONDS,
    Variant,
    ablation_variants,
    build_on_pretrained,
    fast_gpu_settings,
    main_variant,
    measure_train_rate,
    steps_per_epoch_within,
    train_concurrently,
    train_variant,
    variant_spec,
)

STATE_FILE = "recipe.json"
REPORT_JSON, REPORT_TEXT = "report.json", "report.txt"
STAGES = ("pretrain", "main", "ablations", "benchmark")

# ---- the run folder's state ----------------------------------------------------------------------

def preset_record(preset: Preset) -> dict[str, Any]:
    """The preset as recipe.json holds it (tuples become lists), for comparing with a saved one."""
    return json.loads(json.dumps(preset.to_dict()))


class RecipeState:
    """OUT/recipe.json: the preset, finished stages with their times, and shared numbers."""

    def __init__(self, out_dir: Path, preset: Preset):
        self.path = out_dir / STATE_FILE
        self.data: dict[str, Any] = {"preset": preset.to_dict(), "stages": {}, "values": {}}
        if self.path.is_file():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("preset") != preset_record(preset):
                raise ConfigError(
                    f"{out_dir} holds a recipe run with other settings (preset "
                    f"{saved.get('preset', {}).get('name')!r}); resume it with the same preset and --time-scale, "
                    "or use a new output folder"
                )
            self.data = saved

    def done(self, stage: str) -> bool:
        return bool(self.data["stages"].get(stage, {}).get("done"))

    def finish(self, stage: str, seconds: float, **info: Any) -> None:
        self.data["stages"][stage] = {"done": True, "seconds": round(seconds, 1), **info}
        self.save()

    def set(self, key: str, value: Any) -> None:
        self.data["values"][key] = value
        self.save()

    def get(self, key: str) -> Any:
        return self.data["values"].get(key)

    def save(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(json_safe(self.data), indent=2), encoding="utf-8")
        os.replace(tmp, self.path)


def calibrate(preset: Preset, state: RecipeState, out_dir: Path, clip_folder: Path, device: torch.device,
              say: Callable[[str], None]) -> Preset:
    """The preset with steps per epoch that fit its time budget (measured once, then read from
    recipe.json). Each stage's rate is measured (the contrastive stage runs ~3x faster than the
    density stage). Concurrent ablations share the GPU and the cores: each is assumed to run at the
    smaller of its share of the data workers and its share of the GPU, less 10%."""
    if not preset.time_budget:
        return preset
    if state.get("steps_per_epoch") is None:
        t0 = time.time()
        spec = variant_spec(main_variant(preset), preset, out_dir, clip_folder, state.get("train_mean_count"),
                            str(device), False, False)
        train = preset.train
        density_rate = measure_train_rate(spec, out_dir / "calibration")
        contrastive_rate = (measure_train_rate(spec, out_dir / "calibration", "contrastive")
                            if train.contrastive_epochs else density_rate)
        epochs = train.contrastive_epochs + train.density_epochs
        main_seconds = preset.time_budget["main"] - EPOCH_START_SECONDS * epochs
        n_variants = len(preset.ablations) + 1
        workers = preset.ablation_workers or train.num_workers
        share = min(workers / max(1, train.num_workers), 1.0 / n_variants)
        ablation_seconds = preset.time_budget["ablations"] - EPOCH_START_SECONDS * epochs

        def fit(seconds: float, speed: float) -> int:
            return steps_per_epoch_within(seconds, train.contrastive_epochs, train.density_epochs,
                                          speed * contrastive_rate, speed * density_rate)

        state.set("measured_steps_per_second", round(density_rate, 2))
        state.set("measured_contrastive_steps_per_second", round(contrastive_rate, 2))
        state.set("steps_per_epoch", fit(main_seconds, 1.0))
        state.set("ablation_steps_per_epoch", fit(ablation_seconds, 0.9 * share))
        state.set("calibration_seconds", round(time.time() - t0, 1))
        say(f"measured {density_rate:.1f} density / {contrastive_rate:.1f} contrastive training steps/s: "
            f"main {state.get('steps_per_epoch')} steps per epoch, ablations {state.get('ablation_steps_per_epoch')}")
    return dataclasses.replace(preset, steps_per_epoch=state.get("steps_per_epoch"),
                               ablation_steps_per_epoch=state.get("ablation_steps_per_epoch"))


# ---- the recipe -----------------------------------------------------------------------------------

def start_from_clip(source: Path, out_dir: Path, preset: Preset) -> None:
    """Begin `out_dir` with the finished CLIP stage (stages 0-1) of the recipe run `source`.

    Why: the CLIP stage is half of the `cpu` recipe's hour, and runs vary from seed to seed (README),
    so comparing CLIP-Count settings or seeds on one CLIP saves that half and removes one source of
    variance. The preset must train the same CLIP in the same world (its clip, pretrain and world
    settings equal the source's); its CLIP-Count settings may differ. recipe.json then holds the
    source's pretrain stage (marked `reused_from`), so the export names the source and the run's
    total time still counts the CLIP's training. Running the same command again resumes.
    """
    saved = reusable_clip_state(source, preset)
    state_file = out_dir / STATE_FILE
    if state_file.is_file():
        here = json.loads(state_file.read_text(encoding="utf-8"))
        if here.get("stages", {}).get("pretrain", {}).get("reused_from") == str(source.resolve()):
            return  # started from this source before: resume
        raise ConfigError(f"{out_dir} already holds a recipe run; --reuse-clip starts a new run: "
                          "choose a new output folder (or add --fresh to replace it)")
    tmp = out_dir / ".clip.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source / "clip", tmp)
    shutil.rmtree(out_dir / "clip", ignore_errors=True)
    os.replace(tmp, out_dir / "clip")
    values = {k: v for k, v in saved["values"].items() if k == "patch_probe_before"}
    # The training-mean count is drawn from the world with the CLIP-Count seed: kept only if that is the same.
    old = saved["preset"]
    if old["train"].get("seed") == preset.train.seed and old.get("train_mean_n") == preset.train_mean_n:
        values.update({k: v for k, v in saved["values"].items() if k == "train_mean_count"})
    pretrain = {**saved["stages"]["pretrain"], "reused_from": str(source.resolve())}
    state = RecipeState(out_dir, preset)
    state.data.update(stages={"pretrain": pretrain}, values=values)
    state.save()  # written last: a run interrupted before this holds no recipe.json and starts over


def reusable_clip_state(source: Path, preset: Preset) -> dict[str, Any]:
    """recipe.json of `source`, if its CLIP stage has finished with the clip, pretrain and world
    settings `preset` asks for; ConfigError otherwise."""
    path = source / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"{source} is not a recipe run (no {STATE_FILE}); --reuse-clip takes the folder a "
                          "`clipcount synthetic recipe` run wrote")
    saved = json.loads(path.read_text(encoding="utf-8"))
    if not saved.get("stages", {}).get("pretrain", {}).get("done") or not (source / "clip" / "final").is_dir():
        raise ConfigError(f"{source} has not finished its CLIP stage; finish it first (run its recipe again)")
    new = preset_record(preset)
    differ = [part for part in ("clip", "pretrain", "world") if saved["preset"].get(part) != new[part]]
    if differ:
        raise ConfigError(f"{source}'s CLIP was trained with other {', '.join(differ)} settings than preset "
                          f"{preset.name!r} (and --time-scale) ask for; reuse a run of the same preset")
    return saved


def run_recipe(
    out_dir: str | os.PathLike,
    preset: str | Preset = "small",
    device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
    stages: tuple[str, ...] = STAGES,
    time_scale: float = 1.0,
    reuse_clip: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the recipe into `out_dir` (see the module docstring). Returns the benchmark payload
    (or the state when the benchmark stage is not asked for). `time_scale` multiplies the
    preset's time budgets. `reuse_clip`: another recipe run whose finished CLIP stage this run
    starts from (`start_from_clip`)."""
    from clipcount.engine.inference import pick_device

    preset = get_preset(preset, time_scale)
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ConfigError(f"unknown recipe stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    device = pick_device(device)
    out_dir = Path(out_dir)
    if reuse_clip is not None:
        reusable_clip_state(Path(reuse_clip), preset)  # refused before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in (STATE_FILE, "clip", "main", "ablations", REPORT_JSON, REPORT_TEXT):
            target = out_dir / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    if reuse_clip is not None:
        start_from_clip(Path(reuse_clip), out_dir, preset)
    state = RecipeState(out_dir, preset)
    say = _say  # stage messages with times are printed even without progress bars
    say(f"clipcount recipe: preset {preset.name!r} on {device} into {out_dir}")
    if preset.name == "full" and device.type != "cuda":
        say("note: the full preset is sized for a GPU with 16 CPU cores; on a CPU use --preset small")

    clip_folder = out_dir / "clip" / "final"
    # The training-mean baseline needs a few hundred scenes: drawn in a thread while CLIP trains.
    with ThreadPoolExecutor(max_workers=1) as pool:
        mean_job = None
        if state.get("train_mean_count") is None and ({"main", "ablations", "benchmark"} & set(stages)):
            from clipcount.synthetic.stream import mean_training_count

            mean_job = pool.submit(mean_training_count, preset.world_config(), preset.train.seed, preset.train_mean_n)
        if "pretrain" in stages:
            _stage_pretrain(preset, out_dir, state, device, progress, say)
        if mean_job is not None:
            state.set("train_mean_count", mean_job.result())
            say(f"training-mean count {state.get('train_mean_count'):.2f} ({preset.train_mean_n} training scenes)")
    train_mean = state.get("train_mean_count")
    measured = state.get("steps_per_epoch") is not None
    if preset.time_budget and (measured or {"main", "ablations"} & set(stages)):
        if not measured:
            _require(clip_folder, "pretrain")
        preset = calibrate(preset, state, out_dir, clip_folder, device, say)
    if "main" in stages and not state.done("main"):
        _require(clip_folder, "pretrain")
        t0 = time.time()
        variant = main_variant(preset)
        if preset.time_budget:  # sized from a rate measured once; the limit holds if the machine slows
            variant.train.max_seconds = float(preset.time_budget["main"])
        say(f"stage 2: CLIP-Count, {variant.total_steps} steps of batch {variant.train.batch_size}")
        summary = train_variant(variant_spec(variant, preset, out_dir, clip_folder, train_mean, str(device), True,
                                             progress))
        state.finish("main", time.time() - t0, **summary)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the ablations run in processes of their own
    if "ablations" in stages and not state.done("ablations"):
        _require(clip_folder, "pretrain")
        _stage_ablations(preset, out_dir, state, clip_folder, train_mean, device, progress, say)
    if "benchmark" in stages:
        return _stage_benchmark(preset, out_dir, state, train_mean, device, progress, say)
    return state.data


def _stage_pretrain(preset: Preset, out_dir: Path, state: RecipeState, device: torch.device, progress: bool,
                    say: Callable[[str], None]) -> None:
    from clipcount.modeling.clip import CLIP
    from clipcount.synthetic.pretrain import STEM_REPORT, load_clip, pretrain_clip, zero_shot_accuracy
    from clipcount.synthetic.regions import patch_probe

    if state.done("pretrain"):
        return
    t0 = time.time()
    probe_n = max(2, preset.zero_shot_n // 2)
    if state.get("patch_probe_before") is None:  # what an untrained tower's patches already tell apart
        torch.manual_seed(preset.pretrain.seed)
        state.set("patch_probe_before", json_safe(patch_probe(CLIP(preset.clip), probe_n, probe_n // 2,
                                                              crop=preset.pretrain.crop_size, device=device)))
    fast_gpu_settings()
    cfg = dataclasses.replace(preset.pretrain, world={**preset.world, **preset.pretrain.world})
    length = f"{cfg.time_budget_s:.0f} s (at most {cfg.steps} steps)" if cfg.time_budget_s else f"{cfg.steps} steps"
    say(f"stage 1: CLIP pretraining, {length} of batch {cfg.batch_size}")
    result = pretrain_clip(preset.clip, cfg, out_dir / "clip", resume=True, device=device, progress=progress)
    accuracy = zero_shot_accuracy(load_clip(result.final, device), n=preset.zero_shot_n, device=device,
                                  crop_size=cfg.crop_size)  # at the scale the CLIP was trained at
    probe = patch_probe(load_clip(result.final, device), probe_n, probe_n // 2, crop=cfg.crop_size, device=device)
    before = state.get("patch_probe_before")
    say(f"CLIP zero-shot class accuracy (36 classes, chance 0.03): seen {accuracy['seen']:.2f}, "
        f"held-out {accuracy['held_out']:.2f}; per-patch linear probe (chance 0.17): colour "
        f"{before['colour']} -> {probe['colour']:.2f}, shape {before['shape']} -> {probe['shape']:.2f}")
    stem_file = out_dir / "clip" / STEM_REPORT  # stage 0, when the preset has one
    stem = json.loads(stem_file.read_text(encoding="utf-8")) if stem_file.is_file() else None
    if stem is not None:
        say(f"stage 0 (object crops): {stem['steps']} steps, shape accuracy {stem['shape_accuracy']:.2f}, "
            f"colour {stem['colour_accuracy']:.2f}")
    state.finish("pretrain", time.time() - t0, steps=result.step, zero_shot_accuracy=accuracy, stem=stem,
                 patch_probe=json_safe(probe), patch_probe_before=before,
                 final_loss=result.last_loss, final_batch_accuracy=result.last_accuracy)


def _stage_ablations(preset: Preset, out_dir: Path, state: RecipeState, clip_folder: Path, train_mean: float | None,
                     device: torch.device, progress: bool, say: Callable[[str], None]) -> None:
    t0 = time.time()
    variants = ablation_variants(preset)
    if not variants:
        state.finish("ablations", 0.0, variants=[])
        return
    specs = [variant_spec(v, preset, out_dir, clip_folder, train_mean, str(device), True, progress) for v in variants]
    concurrent = preset.concurrent_ablations if preset.concurrent_ablations is not None else device.type == "cuda"
    say(f"stage 3: ablations {', '.join(v.name for v in variants)}, {variants[0].total_steps} steps each"
        + (" (concurrently)" if concurrent else ""))
    if concurrent:
        train_concurrently(specs, progress)
    else:
        for spec in specs:
            train_variant(spec)
    state.finish("ablations", time.time() - t0, variants=[v.name for v in variants])


def _stage_benchmark(preset: Preset, out_dir: Path, state: RecipeState, train_mean: float | None,
                     device: torch.device, progress: bool, say: Callable[[str], None]) -> dict[str, Any]:
    from clipcount.report import write_json
    from clipcount.synthetic.benchmark import benchmark_world, run_benchmark

    t0 = time.time()
    models = {"main": out_dir / "main" / "final"}
    for variant in ablation_variants(preset):
        folder = out_dir / variant.folder / "final"
        if folder.is_dir():
            models[variant.name] = folder
    for label, folder in models.items():
        if not (folder / "model.safetensors").is_file():
            raise CheckpointError(f"{folder} has no trained model; run the recipe's training stages first")
    say(f"stage 4: benchmark, {preset.bench_n} scenes per set, seed {preset.bench_seed}")
    title = f"recipe {preset.name!r}: prompt-fidelity benchmark (seed {preset.bench_seed}, {preset.bench_n} scenes per set)"
    payload = run_benchmark(
        {k: str(v) for k, v in models.items()}, seed=preset.bench_seed, n=preset.bench_n,
        stride=preset.bench_stride, device=str(device), train_mean=train_mean, out=None,
        world=benchmark_world().replace(**preset.bench_world), progress=progress, title=title,
    )
    payload["recipe"] = {"preset": preset.name, "stages": state.data["stages"], "values": state.data["values"],
                         "train_mean_count": train_mean}
    state.finish("benchmark", time.time() - t0)
    payload["recipe"]["stages"] = state.data["stages"]
    payload["recipe"]["total_seconds"] = round(sum(s.get("seconds", 0) for s in state.data["stages"].values()), 1)
    write_json(out_dir / REPORT_JSON, payload)
    (out_dir / REPORT_TEXT).write_text(payload["table_text"] + "\n", encoding="utf-8")
    return payload


def _require(folder: Path, stage: str) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is missing: the recipe's {stage!r} stage has not finished")


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


__all__ = [
    "ABLATIONS",
    "PRESETS",
    "Preset",
    "RecipeState",
    "Variant",
    "ablation_variants",
    "build_on_pretrained",
    "export_demo",
    "full_preset",
    "get_preset",
    "main_variant",
    "model_size_mb",
    "render_example",
    "run_recipe",
    "small_preset",
    "start_from_clip",
    "toy_preset",
    "train_variant",
]
