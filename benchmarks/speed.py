"""How fast clipcount counts, measured against this machine's own limits.

    python benchmarks/speed.py [--quick] [--latency-only] [--out speed.json] [--compile] [--skip-cpu] [--skip-gpu]

One run measures, side by side:
- the ceiling: the best float32 matmul GFLOP/s on the CPU (large random square matrices, torch's
  default threads) and the best bf16 matmul TFLOP/s on the GPU;
- the model's work: the FLOPs of each case, counted with `torch.utils.flop_counter.FlopCounterMode`
  on the very call that is timed (matmuls, convolutions and attention; element-wise work is free
  in this count, so the fraction of the ceiling is a fair measure of how busy the matmul units are);
- the in-run baselines: the `compat` model run as the published evaluation runs (`published_eval`:
  windows padded and batched, the prompt encoded per window, sigmoid blending), which speed-ups are
  quoted against, and the older one-window-at-a-time way (`published_way`) beside it; all CPU
  latency cases are timed in alternation (`measure_alternating`), at fp32, auto and bf16.

Cases, for ViT-B/16 with random weights (speed does not depend on the values) and for the bundled
demo model (skipped with a note when it is not there):
- CPU float32: one 384x576 image with one prompt and with 8 prompts (latency, median of repeats
  after warm-up); the baseline for both; the fast path's counts against the plain float32 path;
  a 384x1152 image at stride 128 and 384 (the speed-up; the MAE cost on synthetic scenes needs a
  trained model, i.e. the demo); a folder of mixed-size images through `clipcount count` (images/s
  end to end, decoding included, and the command's peak RSS); cold start from a saved checkpoint.
- GPU bf16 (when there is one): forward passes of 32/64/128 windows of 384x384, 384x576 images
  through `DensityPredictor.predict_many`, training steps (forward, backward, AdamW) with a density
  MSE loss, the published way under fp16 for reference, bf16 counts against float32 counts, and
  peak memory. `--compile` adds `torch.compile` (eager, with a note, if compiling fails).

`--smoke` runs every code path (the GPU section on the CPU when there is no GPU) with the tiny
test model in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import print_table, write_json  # noqa: E402
from clipcount.config import ClipCountConfig, tiny_config  # noqa: E402
from clipcount.engine.inference import DensityPredictor, cpu_has_native_bf16  # noqa: E402
from clipcount.engine.windows import count_image, resize_to_height  # noqa: E402
from clipcount.modeling.checkpoint import load_model, save_model  # noqa: E402
from clipcount.modeling.clip_count import ClipCount  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "clipcount" / "assets" / "demo"
PROMPTS = ("apples", "red cars", "people", "green triangles", "birds", "blue circles", "cells", "sheep")
MB = 1e6

# The targets (ViT-B/16).
# against the published evaluation (issue 14): 384x576, 2 threads
TARGET_ONE_PROMPT_SPEEDUP = 1.6
TARGET_EIGHT_PROMPT_SPEEDUP = 4.0
TARGET_EXTRA_PROMPT_S = 0.12
TARGET_GPU_INFERENCE_FRACTION = 0.40
TARGET_GPU_TRAINING_FRACTION = 0.30
TARGET_RSS_MB = 1200.0
TARGET_COLD_START_S = 3.0
TARGET_COUNT_REL_DIFF = 0.005  # fast paths against the plain float32 path
TARGET_BF16_REL_DIFF = 0.03  # bf16 against float32: ~3 significant digits per op, a deep net


@dataclass
class Settings:
    """How much to measure; `--quick` and `--smoke` shrink everything."""

    repeats: int = 7  # timed runs of the fast CPU cases (the median is reported)
    warmup: int = 2
    baseline_repeats: int = 3
    baseline_eight_repeats: int = 2  # the 8-prompt baseline takes 8x the 1-prompt one
    ceiling_sizes: tuple[int, ...] = (2048, 4096)
    ceiling_repeats: int = 3
    folder_images: int = 64
    mae_scenes: int = 24
    gpu_repeats: int = 10
    gpu_batches: tuple[int, ...] = (32, 64, 128, 256)
    gpu_images: int = 42  # 384x576 images per predict_many call: 126 windows
    train_batch: int = 64
    smoke: bool = False
    latency_only: bool = False  # only the 384x576 cases and cold start (a loaded machine)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Settings":
        settings = cls._sized(args)
        settings.latency_only = args.latency_only
        return settings

    @classmethod
    def _sized(cls, args: argparse.Namespace) -> "Settings":
        if args.smoke:
            return cls(repeats=2, warmup=1, baseline_repeats=1, baseline_eight_repeats=1, ceiling_sizes=(256,),
                       ceiling_repeats=2, folder_images=4, mae_scenes=2, gpu_repeats=2, gpu_batches=(2, 4),
                       gpu_images=2, train_batch=2, smoke=True)
        if args.quick:
            return cls(repeats=3, warmup=1, baseline_repeats=1, baseline_eight_repeats=1, ceiling_sizes=(2048,),
                       folder_images=16, mae_scenes=8, gpu_repeats=5, gpu_batches=(32, 128), gpu_images=21,
                       train_batch=16)
        return cls()


@dataclass
class Row:
    """One measured case. Times are per call; rates and FLOPs per image."""

    model: str
    case: str
    device: str = "cpu"
    seconds: float | None = None
    images_per_s: float | None = None
    gflop: float | None = None  # model work per image (FlopCounterMode)
    of_ceiling: float | None = None  # achieved FLOP/s over the measured matmul ceiling
    vs_baseline: float | None = None  # speed-up over the in-run baseline (or another stated reference)
    peak_mb: float | None = None
    target: str = ""
    ok: bool | None = None
    note: str = ""

    def cells(self) -> dict[str, Any]:
        return {
            "model": self.model, "case": self.case, "device": self.device,
            "ms": None if self.seconds is None else self.seconds * 1e3,
            "img/s": self.images_per_s, "GFLOP/img": self.gflop,
            "of ceiling": None if self.of_ceiling is None else f"{100 * self.of_ceiling:.1f}%",
            "x baseline": None if self.vs_baseline is None else f"{self.vs_baseline:.2f}x",
            "peak MB": self.peak_mb, "target": self.target or None,
            "ok": None if self.ok is None else ("yes" if self.ok else "NO"), "note": self.note or None,
        }


COLUMNS = ("model", "case", "device", "ms", "img/s", "GFLOP/img", "of ceiling", "x baseline", "peak MB",
           "target", "ok", "note")


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ceilings: dict[str, float] = field(default_factory=dict)  # "cpu_fp32_gflops", "gpu_bf16_tflops"

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        print(f"  {row.model} | {row.case}: " + ", ".join(
            f"{k}={v}" for k, v in row.cells().items() if k not in ("model", "case") and v is not None), flush=True)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)


@dataclass
class Subject:
    """A model under test: its saved checkpoint, and whether the issue's targets apply to it."""

    name: str
    checkpoint: Path
    has_targets: bool  # the targets are stated for ViT-B/16
    trained: bool  # counts mean something (MAE can be measured)
    baseline: Callable[[], ClipCount]  # the model the published way runs on
    baseline_note: str  # what that model is

    def load(self) -> ClipCount:
        return load_model(self.checkpoint)


# ---- measuring -----------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float
    best: float
    runs: list[float]


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> Timing:
    """Median wall time of `repeats` calls after `warmup` calls, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    runs = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        runs.append(time.perf_counter() - start)
    return Timing(statistics.median(runs), min(runs), runs)


def measure_alternating(calls: dict[Any, Callable[[], Any]], repeats: dict[Any, int], warmup: int) -> dict[Any, Timing]:
    """Median wall times, the calls made in rounds (one of each, in turn) instead of one case after
    another: load from other processes that comes and goes then falls on every case alike. A case
    drops out of the rounds once it has its `repeats` runs."""
    device = torch.device("cpu")
    for call in calls.values():
        for _ in range(warmup):
            call()
    runs: dict[Any, list[float]] = {key: [] for key in calls}
    for round_ in range(max(repeats.values())):
        for key, call in calls.items():
            if round_ < repeats[key]:
                start = time.perf_counter()
                call()
                synchronize(device)
                runs[key].append(time.perf_counter() - start)
        print(f"  round {round_ + 1}/{max(repeats.values())} timed", flush=True)
    return {key: Timing(statistics.median(r), min(r), r) for key, r in runs.items()}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, as FlopCounterMode counts them (matmul, convolution, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    # FlopCounterMode knows the GPU attention kernels but not the CPU one: without these, CPU
    # attention would count as free
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return int(counter.get_total_flops())


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Matmul FLOPs of attention: q (..., L, d) k (..., S, d) -> scores (..., L, S) -> x v (..., S, dv)."""
    batch, (length, dim) = math.prod(query_shape[:-2]), query_shape[-2:]
    return 2 * batch * length * key_shape[-2] * (dim + value_shape[-1])


def attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Four matmuls of the forward's sizes (gradients of scores, q, k and v)."""
    return 2 * attention_flops(query_shape, key_shape, value_shape)


def fraction(flops: float, seconds: float, ceiling_flops_per_s: float) -> float | None:
    if not ceiling_flops_per_s or not seconds:
        return None
    return flops / seconds / ceiling_flops_per_s


def cpu_matmul_ceiling(sizes: Sequence[int], repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of square matmuls of `dtype` on the CPU, torch's default threads."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        timing = measure(lambda: a @ b, torch.device("cpu"), repeats, warmup=1)
        best = max(best, 2 * size**3 / timing.best / 1e9)
    return best


def gpu_matmul_ceiling(device: torch.device, size: int = 8192, repeats: int = 5, chain: int = 10) -> float:
    """Best bf16 TFLOP/s of `chain` back-to-back square matmuls (large: the GPU's practical peak)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def run():
        for _ in range(chain):
            torch.mm(a, b)

    timing = measure(run, device, repeats, warmup=2)
    return chain * 2 * size**3 / timing.best / 1e12


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(3, H, W) in [0, 1]: smooth colour fields plus noise, so resizing and decoding do real work."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in rng.uniform(0, 3, 3)]) * 0.3 + 0.5
    noisy = base + 0.15 * rng.standard_normal((3, height, width))
    return torch.from_numpy(noisy.clip(0, 1).astype(np.float32))


# ---- the baseline and the plain path ---------------------------------------------------------------

def published_way(model: ClipCount, image: torch.Tensor, prompts: Sequence[str], stride: int) -> list[float]:
    """Counts the way the published code runs: one window at a time, the prompt re-encoded for every
    window, the image re-encoded for every prompt. On the fast path's own model, it is the plain
    float32 path that the fast path must agree with."""
    window, counts = model.config.window_size, []
    for prompt in prompts:
        density, _ = count_image(image, lambda w, p=prompt: model(w, [p] * w.shape[0]), window, stride, max_batch=1)
        counts.append(float(density.sum()) / model.config.density_scale)
    return counts


# The published evaluation (reference notes, "Evaluation protocol"): the width floored to a multiple
# of 16 and right-padded with zeros by `stride - width % stride` (a whole stride when it divides),
# windows at 0, stride, ... in one batch, the prompt repeated per window and encoded with them, each
# window blended into the running map over their overlap with sigmoid(linspace(-3, 3, overlap)).
PUBLISHED_RAMP = 3.0


def published_eval(model: ClipCount, image: torch.Tensor, prompts: Sequence[str]) -> list[float]:
    """Counts the way the published evaluation runs them, one forward pass per prompt over all the
    windows: the honest baseline, what a user of the published code waits for."""
    window = model.config.window_size
    stride = window // 3  # 128 at the published 384
    resized = resize_to_height(image, window, antialias=False)[0]
    width = resized.shape[-1] // 16 * 16
    padded = F.pad(resized[:, :, :width], (0, stride - width % stride))
    starts = range(0, padded.shape[-1] - window + 1, stride)
    windows = torch.stack([padded[:, :, s : s + window] for s in starts])  # (K, 3, S, S)
    counts = []
    with torch.no_grad():
        for prompt in prompts:
            density = published_blend(model(windows, [prompt] * windows.shape[0])[:, 0], stride)
            counts.append(float(density[:, :width].sum()) / model.config.density_scale)
    return counts


def published_blend(densities: torch.Tensor, stride: int) -> torch.Tensor:
    """(K, S, S) window densities -> (S, S + (K - 1) * stride), blended left to right."""
    overlap = densities.shape[-1] - stride
    ramp = torch.sigmoid(torch.linspace(-PUBLISHED_RAMP, PUBLISHED_RAMP, overlap, dtype=torch.float64)).float()
    canvas = densities[0]
    for incoming in densities[1:]:
        seam = (1 - ramp) * canvas[:, -overlap:] + ramp * incoming[:, :overlap]
        canvas = torch.cat([canvas[:, :-overlap], seam, incoming[:, overlap:]], dim=1)
    return canvas


def relative_difference(ours: Sequence[float], reference: Sequence[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(ours, reference))


# ---- subjects ------------------------------------------------------------------------------------

def vit_b16_subject(tmp: Path, smoke: bool) -> Subject:
    """ViT-B/16 CLIP-Count with random weights, saved as a checkpoint (the CLI and cold start read it)."""
    config = tiny_config if smoke else ClipCountConfig
    name = "tiny (smoke)" if smoke else "ViT-B/16 (random)"
    torch.manual_seed(0)
    folder = save_model(ClipCount(config()), tmp / "vit-b16")

    def baseline() -> ClipCount:
        torch.manual_seed(0)
        return ClipCount(config(compat=True)).eval().requires_grad_(False)

    return Subject(name, folder, has_targets=not smoke, trained=False, baseline=baseline,
                   baseline_note="the compat model (random weights)")


def demo_subject(results: Results) -> Subject | None:
    if not (DEMO / "config.json").is_file():
        results.note(f"demo model rows skipped: the bundled demo model is not at {DEMO} yet")
        return None
    return Subject("demo", DEMO, has_targets=False, trained=True,
                   baseline=lambda: load_model(DEMO).eval().requires_grad_(False), baseline_note="the demo model")


# ---- CPU -----------------------------------------------------------------------------------------

def cpu_section(subject: Subject, settings: Settings, results: Results, tmp: Path) -> None:
    cpu = torch.device("cpu")
    model = subject.load().requires_grad_(False)  # inference only (and FlopCounterMode needs it)
    window = model.config.window_size
    stride = max(1, window // 3)
    image = random_image(window, window * 3 // 2)  # 384x576: three windows
    size = f"{window}x{window * 3 // 2}"
    name, targets = subject.name, subject.has_targets
    precisions = ("fp32", "auto", "bf16") if cpu_has_native_bf16() else ("fp32",)
    predictors = {p: DensityPredictor(model, stride=stride, device=cpu, precision=p) for p in precisions}
    baseline_model = subject.baseline()

    # every case, 1 and 8 prompts; timed in alternation (one call of each per round, medians), so
    # that other processes' load falls on all of them alike
    calls: dict[tuple[str, int], Callable[[], Any]] = {}
    for count in (1, 8):
        prompts = list(PROMPTS[:count])
        for precision, predictor in predictors.items():
            calls[(precision, count)] = lambda pr=predictor, ps=prompts: pr.predict(image, ps)
        calls[("published", count)] = lambda ps=prompts: published_eval(baseline_model, image, ps)
        calls[("one window", count)] = lambda ps=prompts: published_way(baseline_model, image, ps, stride)
    repeats = {key: settings.repeats for key in calls}
    for count, scale in ((1, 1), (8, 2)):  # the baselines are slow: fewer rounds
        for key in ("published", "one window"):
            repeats[(key, count)] = max(1, settings.baseline_repeats // scale)
    timings = measure_alternating(calls, repeats, settings.warmup)
    flops = {key: count_flops(call) for key, call in calls.items() if key[1] == 1}
    flops.update({(key, 8): count_flops(calls[(key, 8)]) for key in precisions})
    flops.update({(key, 8): 8 * flops[(key, 1)] for key in ("published", "one window")})  # 8 separate passes
    ceilings = {"fp32": results.ceilings["cpu_fp32_gflops"] * 1e9,
                "bf16": results.ceilings.get("cpu_bf16_gflops", 0.0) * 1e9}

    for count in (1, 8):
        published = timings[("published", count)].median
        label = f"{count} prompt{'s' * (count > 1)}"
        for precision in precisions:
            timing, work = timings[(precision, count)], flops[(precision, count)]
            ceiling = ceilings["fp32" if precision == "fp32" else "bf16"]
            speedup = published / timing.median
            wanted = TARGET_ONE_PROMPT_SPEEDUP if count == 1 else TARGET_EIGHT_PROMPT_SPEEDUP
            note = best_note(timing, work, ceiling) + ("" if precision == "fp32" else " (of the bf16 ceiling)")
            if precision == "auto":
                note += "; auto here: bf16 matmuls in the image tower's MLPs and the interaction's self-attention and MLPs"
            results.add(Row(name, f"{size}, {label}, {precision}", "cpu", timing.median, 1 / timing.median,
                            work / 1e9, fraction(work, timing.median, ceiling), speedup,
                            target=f">= {wanted:.1f}x published" if targets else "",
                            ok=speedup >= wanted if targets else None, note=note))
        for key, what in (("published", "baseline: published evaluation"), ("one window", "old baseline: one window at a time")):
            timing = timings[(key, count)]
            results.add(Row(name, f"{what}, {label}", "cpu", timing.median, 1 / timing.median,
                            flops[(key, count)] / 1e9, fraction(flops[(key, count)], timing.median, ceilings["fp32"]),
                            published / timing.median,
                            note=f"{subject.baseline_note}, fp32; " + (
                                "windows in one batch, prompt repeated and encoded per window, sigmoid blending"
                                if key == "published" else "one window per pass, text per window")
                            + ("; FLOPs = 8 x one prompt" if count == 8 else "")))
    for precision in precisions:
        extra = (timings[(precision, 8)].median - timings[(precision, 1)].median) / 7
        results.add(Row(name, f"{size}, each extra prompt, {precision}", "cpu", extra,
                        target=f"<= {TARGET_EXTRA_PROMPT_S:.2f} s" if targets else "",
                        ok=extra <= TARGET_EXTRA_PROMPT_S if targets else None,
                        note="(8-prompt median - 1-prompt median) / 7"))
    del baseline_model
    ceiling = ceilings["fp32"]
    predictor = predictors["fp32"]
    for precision in precisions[1:]:  # low precision against the plain float32 counts
        ours = [predictors[precision].count(d) for d in predictors[precision].predict(image, list(PROMPTS[:2]))]
        plain = published_way(model, image, list(PROMPTS[:2]), stride)
        diff = relative_difference(ours, plain)
        results.add(Row(name, f"{precision} = plain fp32 path (counts)", "cpu",
                        target=f"<= {TARGET_COUNT_REL_DIFF:.1%} rel.", ok=diff <= TARGET_COUNT_REL_DIFF,
                        note=f"max rel. diff {diff:.2e} over 2 prompts; random weights, see benchmarks/precision.py"))
    fast = {1: (timings[("fp32", 1)], flops[("fp32", 1)])}

    # every fast path equals the plain float32 path
    fast_counts = [predictor.count(d) for d in predictor.predict(image, list(PROMPTS[:2]))]
    plain_counts = published_way(model, image, list(PROMPTS[:2]), stride)
    diff = relative_difference(fast_counts, plain_counts)
    results.add(Row(name, "fast = plain fp32 path (counts)", "cpu", target=f"<= {TARGET_COUNT_REL_DIFF:.1%} rel.",
                    ok=diff <= TARGET_COUNT_REL_DIFF,
                    note=f"max rel. diff {diff:.2e} over 2 prompts (counts {fast_counts[0]:.4g}, {fast_counts[1]:.4g})"))

    if not settings.latency_only:
        stride_cases(subject, model, settings, results, ceiling)
    del predictor, predictors, model
    if not settings.latency_only:
        folder_case(subject, settings, results, tmp, ceiling, fast[1][1] / 3)
    cold_start_case(subject, results, tmp)


def best_note(timing: Timing, flops: float, ceiling: float) -> str:
    """The fastest run too: on a shared machine the median carries other processes' load."""
    return f"best {timing.best * 1e3:.0f} ms = {fraction(flops, timing.best, ceiling):.1%} of ceiling"


def stride_cases(subject: Subject, model: ClipCount, settings: Settings, results: Results, ceiling: float) -> None:
    """A wide image at the default stride (a third of the window) and at stride = window (no overlap)."""
    cpu = torch.device("cpu")
    window = model.config.window_size
    image = random_image(window, 3 * window, seed=1)
    timings = {}
    for stride in (max(1, window // 3), window):
        predictor = DensityPredictor(model, stride=stride, device=cpu, precision="fp32")
        call = lambda predictor=predictor: predictor.predict(image, [PROMPTS[0]])  # noqa: E731
        timing = measure(call, cpu, max(1, settings.repeats // 2), 1)
        flops = count_flops(call)
        timings[stride] = timing
        results.add(Row(subject.name, f"{window}x{3 * window}, stride {stride}, fp32", "cpu", timing.median,
                        1 / timing.median, flops / 1e9, fraction(flops, timing.median, ceiling),
                        timings[max(1, window // 3)].median / timing.median if stride == window else None,
                        note="x baseline here = speed-up over the default stride" if stride == window else ""))
    if subject.trained:
        stride_mae(subject, model, settings, results)
    else:
        results.note(f"{subject.name}: stride MAE cost not measured (random weights; it needs a trained model)")


def stride_mae(subject: Subject, model: ClipCount, settings: Settings, results: Results) -> None:
    """MAE on wide synthetic scenes at both strides: what the faster stride costs in accuracy."""
    from benchmarks.counting import make_test_scene
    from clipcount.synthetic.world import WorldConfig

    window = model.config.window_size
    world = WorldConfig(height=window, min_width=2 * window, max_width=3 * window)
    scenes = [make_test_scene(20_000_000, "seen", i, world) for i in range(settings.mae_scenes)]
    errors = {}
    for stride in (max(1, window // 3), window):
        predictor = DensityPredictor(model, stride=stride, device="cpu", precision="fp32")
        diffs = []
        for scene in scenes:
            image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255
            density = predictor.predict(image, [scene.prompts["seen"]])[0]
            diffs.append(abs(predictor.count(density) - scene.truths["seen"]))
        errors[stride] = float(np.mean(diffs))
    default, fast = errors[max(1, window // 3)], errors[window]
    results.add(Row(subject.name, f"stride MAE, {len(scenes)} wide synthetic scenes", "cpu",
                    note=f"MAE {default:.2f} at stride {max(1, window // 3)}, {fast:.2f} at stride {window} "
                         f"({fast - default:+.2f})"))


def folder_case(subject: Subject, settings: Settings, results: Results, tmp: Path, ceiling: float,
                flops_per_window: float) -> None:
    """`clipcount count FOLDER` on mixed-size JPEGs: images/s end to end and the command's peak RSS."""
    try:
        import clipcount.cli.count  # noqa: F401
    except ImportError:
        results.note("skipped: clipcount count not available")
        return
    folder = tmp / "folder"
    sizes = write_mixed_images(folder, settings.folder_images)
    window = load_model_config(subject).window_size
    windows = sum(windows_for(h, w, window) for h, w in sizes)
    argv = ["count", str(folder), "-p", PROMPTS[0], "--model", str(subject.checkpoint), "--device", "cpu",
            "--precision", "fp32", "--json", str(tmp / "counts.json")]
    child = run_child(CLI_CHILD, argv)
    if child is None or child.get("exit_code") not in (0, None):
        results.note(f"{subject.name}: clipcount count failed: {child}")
        return
    wall = child["seconds"]
    flops = windows * flops_per_window
    results.add(Row(subject.name, f"clipcount count, folder of {len(sizes)} mixed sizes", "cpu", wall / len(sizes),
                    len(sizes) / wall, flops / len(sizes) / 1e9, fraction(flops, wall, ceiling),
                    peak_mb=child["peak_rss_mb"],
                    target=f"peak RSS <= {TARGET_RSS_MB / 1e3:.1f} GB" if subject.has_targets else "",
                    ok=child["peak_rss_mb"] <= TARGET_RSS_MB if subject.has_targets else None,
                    note=f"{windows} windows; end to end: start-up, model load, decoding included; "
                         "GFLOP estimated from windows"))


def cold_start_case(subject: Subject, results: Results, tmp: Path) -> None:
    """A fresh process: import, load the saved checkpoint, count one image."""
    image = tmp / "one.jpg"
    write_jpeg(image, 384, 576, seed=5)
    child = run_child(COLD_CHILD, [str(subject.checkpoint), str(image), PROMPTS[0]])
    if child is None:
        results.note(f"{subject.name}: the cold-start process failed")
        return
    seconds = child["load_s"] + child["first_count_s"]
    results.add(Row(subject.name, "cold start: checkpoint -> first count", "cpu", seconds,
                    peak_mb=child["peak_rss_mb"],
                    target=f"<= {TARGET_COLD_START_S:.0f} s, RSS <= {TARGET_RSS_MB / 1e3:.1f} GB" if subject.has_targets else "",
                    ok=(seconds <= TARGET_COLD_START_S and child["peak_rss_mb"] <= TARGET_RSS_MB)
                    if subject.has_targets else None,
                    note=f"load {child['load_s']:.2f} s + first count {child['first_count_s']:.2f} s; "
                         f"import {child['import_s']:.2f} s; process total {child['seconds']:.2f} s"))


def load_model_config(subject: Subject) -> ClipCountConfig:
    from clipcount.modeling.checkpoint import read_config

    return read_config(subject.checkpoint)[0]


def windows_for(height: int, width: int, window: int) -> int:
    """Windows of an image after resizing to the window height, at the default stride."""
    from clipcount.engine.windows import plan_windows

    resized = max(1, round(width * window / height))
    return plan_windows(window, resized, window, max(1, window // 3)).num_windows


MIXED_SIZES = ((384, 576), (480, 640), (768, 1024), (300, 400), (600, 1200), (384, 384), (1080, 1920), (256, 768))


def write_mixed_images(folder: Path, count: int) -> list[tuple[int, int]]:
    """`count` JPEGs cycling through MIXED_SIZES (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [MIXED_SIZES[i % len(MIXED_SIZES)] for i in range(count)]
    for index, (height, width) in enumerate(sizes):
        write_jpeg(folder / f"image_{index:03d}.jpg", height, width, seed=index)
    return sizes


def write_jpeg(path: Path, height: int, width: int, seed: int) -> None:
    from PIL import Image

    pixels = (random_image(height, width, seed).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


# Child processes report one JSON line on stdout: their own wall time and peak RSS. The peak is the
# kernel's VmHWM: ru_maxrss would carry over this (large) process's RSS through fork and exec.
PEAK_RSS = """
def peak_rss_mb():
    import resource
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024 / 1e6
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
"""

CLI_CHILD = PEAK_RSS + """
import contextlib, io, json, runpy, sys, time
start = time.perf_counter()
sys.argv = ["clipcount"] + sys.argv[1:]
code = 0
try:
    with contextlib.redirect_stdout(io.StringIO()):
        runpy.run_module("clipcount", run_name="__main__", alter_sys=True)
except SystemExit as exit:
    code = exit.code
print(json.dumps({"exit_code": code, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}))
"""

COLD_CHILD = PEAK_RSS + """
import json, sys, time
start = time.perf_counter()
import torch
from clipcount.api import Counter
imported = time.perf_counter()
counter = Counter.from_pretrained(sys.argv[1], device="cpu", precision="fp32")
loaded = time.perf_counter()
counter.count(sys.argv[2], sys.argv[3])
done = time.perf_counter()
print(json.dumps({"seconds": done - start, "import_s": imported - start, "load_s": loaded - imported,
                  "first_count_s": done - loaded, "peak_rss_mb": peak_rss_mb()}))
"""


def run_child(code: str, argv: Sequence[str]) -> dict[str, Any] | None:
    """Run `code` in a fresh Python with the repository importable; its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(done.stderr[-2000:], file=sys.stderr)
        return None
    report["process_wall_s"] = wall
    return report


# ---- GPU -----------------------------------------------------------------------------------------

def gpu_section(subject: Subject, device: torch.device, settings: Settings, results: Results,
                use_compile: bool) -> None:
    ceiling = results.ceilings["gpu_bf16_tflops"] * 1e12
    name, targets = subject.name, subject.has_targets
    model = subject.load().to(device).eval().requires_grad_(False)
    window = model.config.window_size
    predictor = DensityPredictor(model, stride=max(1, window // 3), max_batch=128, device=device, precision="bf16")
    text = predictor.encode_prompts([PROMPTS[0]])  # (1, 1, E), cached

    def forward(windows: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            features = model.encode_image(windows)
            return model.density_from_features(features, text, (window, window))

    # FLOPs are counted on the eager model, before any compiling
    per_window = count_flops(lambda: forward(torch.rand(1, 3, window, window, device=device)))
    first = torch.rand(settings.gpu_batches[0], 3, window, window, device=device)
    compile_note = maybe_compile(model, use_compile, lambda: forward(first), results)

    for batch in settings.gpu_batches:
        windows = torch.rand(batch, 3, window, window, device=device)
        reset_peak(device)
        timing = measure(lambda windows=windows: forward(windows), device, settings.gpu_repeats, warmup=3)
        share = fraction(per_window * batch, timing.median, ceiling)
        results.add(Row(name, f"{window}x{window} forward, batch {batch}, bf16", device.type, timing.median,
                        batch / timing.median, per_window / 1e9, share, peak_mb=gpu_peak_mb(device),
                        target=f">= {TARGET_GPU_INFERENCE_FRACTION:.0%} of ceiling" if targets else "",
                        ok=share >= TARGET_GPU_INFERENCE_FRACTION if targets else None, note=compile_note))

    # whole 384x576 images through the predictor: windows of many images share forward passes
    images = [random_image(window, window * 3 // 2, seed=i) for i in range(settings.gpu_images)]
    call = lambda: predictor.predict_many(images, [PROMPTS[0]])  # noqa: E731
    reset_peak(device)
    timing = measure(call, device, max(2, settings.gpu_repeats // 2), warmup=2)
    ours = len(images) / timing.median
    share = fraction(3 * per_window * len(images), timing.median, ceiling)
    row = results.add(Row(name, f"{window}x{window * 3 // 2} images, predict_many x{len(images)}, bf16", device.type,
                          timing.median / len(images), ours, 3 * per_window / 1e9, share, peak_mb=gpu_peak_mb(device),
                          target=f">= {TARGET_GPU_INFERENCE_FRACTION:.0%} of ceiling" if targets else "",
                          ok=share >= TARGET_GPU_INFERENCE_FRACTION if targets else None,
                          note="end to end: windows cut, sent, merged, densities back on the CPU; " + compile_note))
    base_rate = published_gpu_cases(subject, device, images[: max(2, len(images) // 2)], settings, results, ceiling)
    row.vs_baseline = None if base_rate is None else ours / base_rate

    uncompile(model)  # the float32 reference below runs eager
    bf16_agreement(model, predictor, images[:4], device, results, name)
    del predictor, model
    training_case(subject, device, settings, results, ceiling, use_compile)


def maybe_compile(model: ClipCount, use_compile: bool, first_call: Callable[[], Any], results: Results) -> str:
    """Compile the calls the predictor makes (instance attributes shadow the methods), and run
    `first_call` to compile now; fall back to eager, with a note, if compiling fails."""
    if not use_compile:
        return "eager"
    try:
        for attr in COMPILED:
            setattr(model, attr, torch.compile(getattr(model, attr)))
        first_call()
        return "torch.compile"
    except Exception as error:  # noqa: BLE001 - any compiler failure means: measure eager
        uncompile(model)
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        results.note(f"torch.compile failed ({type(error).__name__}: {first_line}); measured eager")
        return "eager (compile failed)"


COMPILED = ("encode_image", "shared_features", "density_from_shared")  # what DensityPredictor calls


def uncompile(model: ClipCount) -> None:
    for attr in COMPILED:
        model.__dict__.pop(attr, None)


def published_gpu_cases(subject: Subject, device: torch.device, images: list[torch.Tensor], settings: Settings,
                        results: Results, ceiling: float) -> float | None:
    """The published way on the GPU, under fp16 autocast, with the prompt re-encoded for every window:
    one image at a time (its windows in one batch), and the largest batch of windows (128). Returns
    the images/s of the first, the reference for our 384x576 rate."""
    model = subject.baseline().to(device)
    window, stride = model.config.window_size, max(1, model.config.window_size // 3)

    def count_one(image: torch.Tensor) -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
            count_image(image.to(device), lambda w: model(w, [PROMPTS[0]] * w.shape[0]), window, stride, max_batch=64)

    timing = measure(lambda: [count_one(image) for image in images], device, max(1, settings.gpu_repeats // 5), 1)
    rate = len(images) / timing.median
    flops = count_flops(lambda: count_one(images[0]))  # per image
    results.add(Row(subject.name, "baseline: published way, one image at a time, fp16", device.type,
                    1 / rate, rate, flops / 1e9, fraction(flops * len(images), timing.median, ceiling),
                    note=f"{subject.baseline_note}; its windows in one batch, text encoded per window"))

    windows = torch.rand(settings.gpu_batches[-1], 3, window, window, device=device)

    def batch() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16):
            model(windows, [PROMPTS[0]] * windows.shape[0])

    timing = measure(batch, device, settings.gpu_repeats, warmup=2)
    flops = count_flops(batch)
    size = windows.shape[0]
    results.add(Row(subject.name, f"baseline: published way, {size} windows {window}x{window}, fp16", device.type,
                    timing.median, size / timing.median, flops / size / 1e9, fraction(flops, timing.median, ceiling),
                    note="img/s = windows/s; text encoded per window"))
    del model
    return rate


def bf16_agreement(model: ClipCount, predictor: DensityPredictor, images: list[torch.Tensor], device: torch.device,
                   results: Results, name: str) -> None:
    """bf16 counts against float32 counts of the same model on the same device."""
    reference = DensityPredictor(model, stride=predictor.stride, max_batch=predictor.max_batch, device=device,
                                 precision="fp32")
    fast = [predictor.count(d[0]) for d in predictor.predict_many(images, [PROMPTS[0]])]
    plain = [reference.count(d[0]) for d in reference.predict_many(images, [PROMPTS[0]])]
    diff = relative_difference(fast, plain)
    results.add(Row(name, f"bf16 = fp32 counts, {len(images)} images", device.type,
                    target=f"<= {TARGET_BF16_REL_DIFF:.0%} rel.", ok=diff <= TARGET_BF16_REL_DIFF,
                    note=f"max rel. diff {diff:.2e}"))


def training_case(subject: Subject, device: torch.device, settings: Settings, results: Results,
                  ceiling: float, use_compile: bool = False) -> None:
    """Training steps: forward, density MSE, backward, AdamW on the trainable parameters, bf16 autocast
    (the model's image and density calls compiled with `use_compile`)."""
    model = subject.load().to(device).train()
    window, batch = model.config.window_size, settings.train_batch
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    windows = torch.rand(batch, 3, window, window, device=device)
    targets = torch.rand(batch, 1, window, window, device=device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            density = model(windows, prompts)
        F.mse_loss(density.float(), targets).backward()
        optimizer.step()

    step()  # creates the optimizer state
    flops = count_flops(step)  # on the eager model
    compile_note = maybe_compile(model, use_compile, step, results)
    reset_peak(device)
    timing = measure(step, device, settings.gpu_repeats, warmup=2)
    share = fraction(flops, timing.median, ceiling)
    results.add(Row(subject.name, f"training step, batch {batch}, bf16", device.type, timing.median,
                    batch / timing.median, flops / batch / 1e9, share, peak_mb=gpu_peak_mb(device),
                    target=f">= {TARGET_GPU_TRAINING_FRACTION:.0%} of ceiling" if subject.has_targets else "",
                    ok=share >= TARGET_GPU_TRAINING_FRACTION if subject.has_targets else None,
                    note=f"forward + backward + AdamW, text encoded per sample; {compile_note}"))
    uncompile(model)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None


# ---- main ----------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and images (a few minutes on 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, every code path, seconds; numbers mean nothing")
    parser.add_argument("--out", default="speed.json", help="where to write the JSON results (default: speed.json)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the model on the GPU (slower start)")
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    parser.add_argument("--skip-gpu", action="store_true", help="only the CPU section")
    parser.add_argument("--latency-only", action="store_true",
                        help="CPU: only the 384x576 cases and cold start (no stride, folder or MAE cases)")
    parser.add_argument("--no-demo", action="store_true", help="leave out the bundled demo model")
    return parser.parse_args(argv)


def accelerator(args: argparse.Namespace, results: Results) -> torch.device | None:
    if args.skip_gpu:
        return None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if args.smoke:
        results.note("smoke run: the GPU section runs on the CPU")
        return torch.device("cpu")
    results.note("no GPU here: GPU rows skipped")
    return None


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.from_args(args)
    results = Results()
    results.note(f"load average at the start: {load_average()} (other processes make every number slower)")
    with tempfile.TemporaryDirectory(prefix="clipcount-speed-") as tmp_name:
        tmp = Path(tmp_name)
        subjects = [vit_b16_subject(tmp, settings.smoke)]
        demo = None if args.no_demo or settings.smoke else demo_subject(results)
        subjects += [demo] if demo else []
        if not args.skip_cpu:
            dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if cpu_has_native_bf16() else {})
            for key, dtype in dtypes.items():
                results.ceilings[f"cpu_{key}_gflops"] = cpu_matmul_ceiling(settings.ceiling_sizes,
                                                                           settings.ceiling_repeats, dtype)
                print(f"CPU {key} matmul ceiling: {results.ceilings[f'cpu_{key}_gflops']:.1f} GFLOP/s "
                      f"({torch.get_num_threads()} threads)", flush=True)
            for subject in subjects:
                cpu_section(subject, settings, results, tmp)
            for key, dtype in dtypes.items():
                again = cpu_matmul_ceiling(settings.ceiling_sizes, settings.ceiling_repeats, dtype)
                results.note(f"CPU {key} ceiling measured again after the CPU cases: {again:.1f} GFLOP/s "
                             f"(fractions use the first, {results.ceilings[f'cpu_{key}_gflops']:.1f})")
        device = accelerator(args, results)
        if device is not None:
            if device.type == "cuda":
                results.ceilings["gpu_bf16_tflops"] = gpu_matmul_ceiling(device)
            else:
                results.ceilings["gpu_bf16_tflops"] = cpu_matmul_ceiling(settings.ceiling_sizes, 1) / 1e3
            print(f"{device.type} bf16 matmul ceiling: {results.ceilings['gpu_bf16_tflops']:.1f} TFLOP/s", flush=True)
            for subject in subjects:
                gpu_section(subject, device, settings, results, args.compile)

    results.note(f"load average at the end: {load_average()}")
    ceilings = ", ".join(f"{k} = {v:.4g}" for k, v in results.ceilings.items())
    print()
    table = print_table([row.cells() for row in results.rows], COLUMNS, title=f"clipcount speed ({ceilings})")
    for text in results.notes:
        print(f"note: {text}")
    write_json(args.out, {"benchmark": "speed", "settings": asdict(settings), "ceilings": results.ceilings,
                          "rows": [asdict(row) for row in results.rows], "notes": results.notes, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
