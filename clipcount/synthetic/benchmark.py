"""Prompt fidelity, measured the way users meet it: does the model count what it is told?

Every test scene holds 2-4 classes on a varied background, with object sizes and crowding drawn per
scene, and is counted whole with the sliding-window protocol (DensityPredictor). Rows:

    row          scenes                                           prompt             true count
    seen         training classes only                            "red crosses"      that class
    shape_only   the seen scenes                                  "crosses"          every colour
    singular     the seen scenes                                  "red cross"        that class
    template     the seen scenes                                  "a photo of ..."   that class
    held_out     the prompted class is held out (zero-shot)       "green triangles"  that class
    minority     another class is more numerous than the prompted "blue circles"     that class
    absent       the seen scenes; a class differing from a        "blue stars"       0
                 present one in one attribute when possible
    blank        background only, any width                       any class          0

Scores: MAE, RMSE, NAE (= MAE / mean true count), bias and the mean predicted count (the number
that matters where the truth is 0), for the model and four baselines: always answering the training
mean count; a perfect class-agnostic counter (the number of all objects in the scene); and two
perfect counters that read only one word of the prompt: shape-blind (every object of the prompted
colour; every object for a shape-only prompt) and colour-blind (every object of the prompted
shape). A model beats the blind counters only by knowing both attributes: they bound what perfect
counting with features that lack shape (or colour) can score on these scenes.

`run_benchmark` is what `benchmarks/counting.py`, the synthetic recipe and the experiments call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipcount.errors import ConfigError
from clipcount.synthetic.prompts import TRAIN_CLASSES, format_prompt, hard_negatives, parse_prompt
from clipcount.synthetic.world import (
    WorldConfig,
    as_rng,
    make_fidelity_scene,
    make_held_out_scene,
    make_seen_scene,
)

DEFAULT_SEED = 10_000_000
DEFAULT_N = 100
ROWS = ("seen", "shape_only", "singular", "template", "held_out", "minority", "absent", "blank")
ROW_TITLES = {
    "seen": "seen classes",
    "shape_only": "shape-only prompts",
    "singular": "singular prompts",
    "template": "template wording",
    "held_out": "held-out classes (zero-shot)",
    "minority": "minority class",
    "absent": "absent class (true 0)",
    "blank": "blank image (true 0)",
}
SCENE_SETS = ("seen", "held_out", "minority", "blank")
ROW_SCENES = {"seen": "seen", "shape_only": "seen", "singular": "seen", "template": "seen", "absent": "seen",
              "held_out": "held_out", "minority": "minority", "blank": "blank"}
ZERO_ROWS = ("absent", "blank")
TEMPLATES = ("a photo of {}", "there are {} in the picture", "count the {}")
# Crowding: the overlap bound of each scene (WorldConfig.separation), drawn per scene.
SEPARATIONS = (0.15, 0.35, 0.6, 1.0)
COLUMNS = ("model", "row", "n", "true_mean", "pred_mean", "MAE", "RMSE", "NAE", "bias", "mean_NAE",
           "agnostic_NAE", "shape_blind_NAE", "colour_blind_NAE")
# The targets for the bundled model: NAE limits, mean predicted count limits for true-0 rows,
# and every row at least 4x better than the training-mean baseline.
NAE_TARGETS = {"seen": 0.10, "held_out": 0.20, "minority": 0.20, "shape_only": 0.15}
ZERO_TARGETS = {"absent": 0.5, "blank": 0.5}


def benchmark_world() -> WorldConfig:
    """The test world: 2-4 classes per scene, 10-40 px objects, up to 40 per class, 384-1024 wide."""
    return WorldConfig(mode="test", min_width=384, max_width=1024, min_size=10.0, max_size=40.0,
                       max_per_class=40, classes_per_scene=(2, 4))


@dataclass
class BenchScene:
    """One test scene and what is asked of it: row -> prompt and row -> true count."""

    kind: str
    index: int
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8
    prompts: dict[str, str]
    truths: dict[str, int]
    total: int  # every object in the scene (the class-agnostic answer)
    # row -> what the perfect shape-blind / colour-blind counters answer (see the module docstring)
    shape_blind: dict[str, int] = field(default_factory=dict)
    colour_blind: dict[str, int] = field(default_factory=dict)


# ---- test scenes ---------------------------------------------------------------------------------

def scene_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    """Scene `index` of set `kind`: its own seed sequence, independent of every other scene."""
    return np.random.default_rng(np.random.SeedSequence([seed, SCENE_SETS.index(kind), index, 11]))


def make_test_scene(seed: int, kind: str, index: int, world: WorldConfig | None = None) -> BenchScene:
    """Scene `index` of set `kind` ("seen", "held_out", "minority" or "blank") with its prompts."""
    rng = scene_rng(seed, kind, index)
    world = (world or benchmark_world()).replace(mode="test")
    world = world.replace(separation=float(SEPARATIONS[int(rng.integers(len(SEPARATIONS)))]))
    if kind == "blank":
        return _blank_scene(rng, world, index)
    makers = {"seen": make_seen_scene, "held_out": make_held_out_scene, "minority": make_minority_scene}
    if kind not in makers:
        raise ConfigError(f"unknown benchmark scene set {kind!r}; choose one of {', '.join(SCENE_SETS)}")
    scene, prompt = makers[kind](rng, world)
    colour, shape = target = parse_prompt(prompt)
    if kind == "seen":
        present = sorted(scene.class_counts())
        hard = hard_negatives(present, TRAIN_CLASSES)
        absent = hard or [c for c in TRAIN_CLASSES if c not in present]
        absent_class = absent[int(rng.integers(len(absent)))]
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        asked = {"seen": (target, format_prompt(colour, shape)),
                 "shape_only": ((None, shape), format_prompt(None, shape)),
                 "singular": (target, format_prompt(colour, shape, plural=False)),
                 "template": (target, template.format(format_prompt(colour, shape))),
                 "absent": (absent_class, format_prompt(*absent_class))}
    else:
        asked = {kind: (target, format_prompt(colour, shape))}
    prompts = {row: prompt for row, (_, prompt) in asked.items()}
    truths = {row: len(scene.select(*cls)) for row, (cls, _) in asked.items()}
    shape_blind = {row: len(scene.select(colour=cls[0])) for row, (cls, _) in asked.items()}
    colour_blind = {row: len(scene.select(shape=cls[1])) for row, (cls, _) in asked.items()}
    return BenchScene(kind, index, scene.image, prompts, truths, len(scene.objects), shape_blind, colour_blind)


def make_minority_scene(rng: np.random.Generator | int, world: WorldConfig):
    """A scene and prompt whose class (1-12 objects) is outnumbered by another class (16-60)."""
    return make_fidelity_scene(as_rng(rng), world, minority=(1, 12), dominant=(16, 60))


def _blank_scene(rng: np.random.Generator, world: WorldConfig, index: int) -> BenchScene:
    from clipcount.synthetic.render import render_background

    width = int(rng.integers(world.min_width, world.max_width + 1))
    image = np.asarray(render_background(rng, world.height, width), dtype=np.uint8)
    cls = TRAIN_CLASSES[int(rng.integers(len(TRAIN_CLASSES)))]
    zero = {"blank": 0}
    return BenchScene("blank", index, image, {"blank": format_prompt(*cls)}, dict(zero), 0, dict(zero), dict(zero))


def make_test_set(seed: int = DEFAULT_SEED, n: int = DEFAULT_N, world: WorldConfig | None = None,
                  progress: bool = True) -> list[BenchScene]:
    """n scenes of each set (seen, held_out, minority, blank), generated from `seed`."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ConfigError(f"the benchmark needs at least one scene per row, got n={n}")
    jobs = [(kind, i) for kind in SCENE_SETS for i in range(n)]
    return [make_test_scene(seed, kind, i, world)
            for kind, i in tqdm(jobs, desc="test scenes", unit="scene", disable=not progress, dynamic_ncols=True)]


# ---- counting -------------------------------------------------------------------------------------

def load_checkpoint(source: str | Path):
    """A clipcount checkpoint folder or model name ("demo") -> (model, its config.json as a dict)."""
    from clipcount.modeling.checkpoint import load_model, read_config
    from clipcount.models import resolve_model

    folder = resolve_model(source)
    _, data = read_config(folder)
    return load_model(folder), data


def predict(model, scenes: Sequence[BenchScene], stride: int = 128, device: str | None = None,
            precision: str = "auto", progress: bool = True, label: str = "") -> dict[str, list[float]]:
    """Count every row's prompt in every scene (each scene encoded once for all its prompts):
    row -> predicted counts, in scene order."""
    import torch
    from tqdm.auto import tqdm

    from clipcount.engine.inference import DensityPredictor

    # a model with smaller windows than the protocol's 384 gets a stride that still covers every column
    predictor = DensityPredictor(model, stride=min(stride, model.config.window_size), device=device,
                                 precision=precision)
    preds: dict[str, list[float]] = {row: [] for row in ROWS}
    for scene in tqdm(scenes, desc=f"count {label}".strip(), unit="scene", disable=not progress, dynamic_ncols=True):
        rows = list(scene.prompts)
        image = torch.from_numpy(scene.image.transpose(2, 0, 1).astype(np.float32) / 255.0)  # (3, H, W)
        densities = predictor.predict(image, [scene.prompts[r] for r in rows])
        for row, density in zip(rows, densities):
            preds[row].append(predictor.count(density))
    return preds


def truths_by_row(scenes: Sequence[BenchScene]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """row -> true counts, and row -> total objects of the same scenes, in scene order."""
    truths: dict[str, list[int]] = {row: [] for row in ROWS}
    totals: dict[str, list[int]] = {row: [] for row in ROWS}
    for scene in scenes:
        for row, truth in scene.truths.items():
            truths[row].append(truth)
            totals[row].append(scene.total)
    return truths, totals


def _metrics(pred: Sequence[float], truth: Sequence[int]) -> dict[str, float]:
    from clipcount.engine.metrics import count_metrics

    out = count_metrics(pred, truth).to_dict()
    out["pred_mean"] = float(np.mean(pred))
    out["bias"] = float(np.mean(np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64)))
    return out


def blind_counts(scenes: Sequence[BenchScene], attribute: str) -> dict[str, list[int]]:
    """row -> what the perfect `attribute` ("shape_blind" or "colour_blind") counter answers, in
    scene order; scenes made without them (older code, hand-made tests) fall back to the truth."""
    out: dict[str, list[int]] = {row: [] for row in ROWS}
    for scene in scenes:
        answers = getattr(scene, attribute)
        for row, truth in scene.truths.items():
            out[row].append(answers.get(row, truth))
    return out


def score(scenes: Sequence[BenchScene], preds: Mapping[str, Sequence[float]], train_mean: float) -> dict[str, dict]:
    """row -> {n, true_mean, model, mean, agnostic, shape_blind, colour_blind}: each a metrics dict
    (mae, rmse, nae, bias, pred_mean, ...)."""
    truths, totals = truths_by_row(scenes)
    blind = {name: blind_counts(scenes, name) for name in ("shape_blind", "colour_blind")}
    result = {}
    for row in ROWS:
        truth = truths[row]
        if not truth:
            continue
        result[row] = {
            "n": len(truth),
            "true_mean": float(np.mean(truth)),
            "model": _metrics(preds[row], truth),
            "mean": _metrics([train_mean] * len(truth), truth),
            "agnostic": _metrics(totals[row], truth),
            **{name: _metrics(answers[row], truth) for name, answers in blind.items()},
        }
    return result


def table_rows(label: str, scores: Mapping[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for row, s in scores.items():
        model = s["model"]
        rows.append({"model": label, "row": ROW_TITLES[row], "n": s["n"], "true_mean": s["true_mean"],
                     "pred_mean": model["pred_mean"], "MAE": model["mae"], "RMSE": model["rmse"],
                     "NAE": model["nae"], "bias": model["bias"], "mean_NAE": s["mean"]["nae"],
                     "agnostic_NAE": s["agnostic"]["nae"],
                     "shape_blind_NAE": s["shape_blind"]["nae"], "colour_blind_NAE": s["colour_blind"]["nae"]})
    return rows


def check_targets(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The bundled model's targets, checked row by row: NAE limits (and at least 4x below the
    training-mean baseline's NAE), and mean predicted counts where the truth is 0 (at least 4x
    below the training mean's answer)."""
    checks = {}
    for row, limit in NAE_TARGETS.items():
        if row in results:
            nae, base = results[row]["model"]["nae"], results[row]["mean"]["nae"]
            met = math.isfinite(nae) and nae <= limit and nae * 4 <= base
            checks[row] = {"value": nae, "measure": "NAE", "target": limit, "baseline": base, "met": bool(met)}
    for row, limit in ZERO_TARGETS.items():
        if row in results:
            value, base = results[row]["model"]["pred_mean"], results[row]["mean"]["pred_mean"]
            checks[row] = {"value": value, "measure": "mean predicted", "target": limit, "baseline": base,
                           "met": bool(value <= limit and value * 4 <= base)}
    return checks


def format_targets(checks: Mapping[str, Mapping[str, Any]]) -> str:
    return "targets: " + "; ".join(
        f"{row} {c['measure']} {c['value']:.3f} <= {c['target']}: {'met' if c['met'] else 'NOT met'}"
        for row, c in checks.items())


# ---- the training mean ----------------------------------------------------------------------------

def train_mean_of(config: Mapping[str, Any]) -> float | None:
    """The training-mean count a checkpoint's config.json records, if any."""
    value = (config.get("synthetic") or {}).get("train_mean_count")
    return float(value) if value is not None else None


def training_seeds_of(config: Mapping[str, Any]) -> set[int]:
    synthetic = config.get("synthetic") or {}
    seeds = set(synthetic.get("train_seeds") or [])
    train_cfg = (config.get("training") or {}).get("train_config") or {}
    if "seed" in train_cfg and synthetic:
        seeds.add(int(train_cfg["seed"]))
    return {int(s) for s in seeds}


TRAIN_MEAN_SAMPLES = 500


# ---- the whole benchmark --------------------------------------------------------------------------

def run_benchmark(
    models: Mapping[str, Any],
    seed: int = DEFAULT_SEED,
    n: int = DEFAULT_N,
    stride: int = 128,
    device: str | None = None,
    precision: str = "auto",
    train_mean: float | None = None,
    out: str | Path | None = None,
    world: WorldConfig | None = None,
    progress: bool = True,
    title: str = "",
) -> dict[str, Any]:
    """Score every model (label -> checkpoint folder, model name or loaded ClipCount) on one test
    set. The first model is the main one: the training mean is read from its config unless given.
    Prints one table; writes JSON to `out` when given. Returns the JSON payload."""
    from clipcount.report import print_table, write_json

    if not models:
        raise ConfigError("give at least one model to benchmark")
    started = time.time()
    loaded = {label: _load(source) for label, source in models.items()}
    first_config = next(iter(loaded.values()))[1]
    for label, (_, config) in loaded.items():
        if seed in training_seeds_of(config):
            raise ConfigError(f"test seed {seed} is a training seed of model {label!r}; choose another --seed")
    train_mean, train_mean_source = _train_mean(train_mean, first_config, world)
    scenes = make_test_set(seed, n, world, progress)
    results, rows, per_image = {}, [], {}
    for label, (model, _) in loaded.items():
        t0 = time.time()
        preds = predict(model, scenes, stride, device, precision, progress, label)
        results[label] = score(scenes, preds, train_mean)
        results[label]["seconds"] = round(time.time() - t0, 2)
        rows += table_rows(label, {k: v for k, v in results[label].items() if k in ROWS})
        per_image[label] = {row: [round(float(p), 3) for p in preds[row]] for row in ROWS}
    title = title or f"prompt-fidelity benchmark (seed {seed}, {n} scenes per set, stride {stride})"
    text = print_table(rows, COLUMNS, title)
    truths, totals = truths_by_row(scenes)
    payload = {
        "benchmark": "synthetic prompt fidelity",
        "seed": seed, "n": n, "stride": stride,
        "train_mean": train_mean, "train_mean_source": train_mean_source,
        "models": {label: str(source) if not hasattr(source, "config") else "(in memory)"
                   for label, source in models.items()},
        "results": results,
        "targets": check_targets(results[next(iter(results))]),
        "table": rows,
        "table_text": text,
        "per_image": {"truth": truths, "total": totals, "prompts": _prompts(scenes), "pred": per_image},
        "seconds": round(time.time() - started, 2),
    }
    if out is not None:
        write_json(out, payload)
    return payload


def _train_mean(given: float | None, config: Mapping[str, Any], world: WorldConfig | None) -> tuple[float, str]:
    if given is not None:
        return float(given), "given"
    recorded = train_mean_of(config)
    if recorded is not None:
        return recorded, "checkpoint config"
    from clipcount.synthetic.stream import mean_training_count

    measured = mean_training_count((world or benchmark_world()).replace(mode="train"), seed=0, n=TRAIN_MEAN_SAMPLES)
    return measured, f"measured on {TRAIN_MEAN_SAMPLES} training scenes of seed 0"


def _load(source: Any):
    if hasattr(source, "config") and hasattr(source, "encode_image"):  # a ClipCount already in memory
        return source, {}
    return load_checkpoint(source)


def _prompts(scenes: Sequence[BenchScene]) -> dict[str, list[str]]:
    prompts: dict[str, list[str]] = {row: [] for row in ROWS}
    for scene in scenes:
        for row, prompt in scene.prompts.items():
            prompts[row].append(prompt)
    return prompts


__all__ = [
    "COLUMNS", "DEFAULT_N", "DEFAULT_SEED", "ROWS", "ROW_TITLES", "BenchScene", "benchmark_world",
    "check_targets", "format_targets", "make_test_scene", "make_test_set", "predict", "run_benchmark", "score",
]
