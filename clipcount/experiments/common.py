"""What every experiment shares: budgets, the run context (seeds, folders, data), and the report.

An experiment is a function `run(ctx) -> Report`. The runner (`run_experiment`) builds the context
from the command line, calls it, and writes OUT/report.md (tables, plots, findings, then the
seeds and every setting needed to rerun it) and OUT/results.json (the same numbers, machine
readable, with machine facts, written atomically).

Budgets fix everything that decides cost: the synthetic world's image size, the CLIP architecture
and its pretraining, the CLIP-Count sizes, the training steps and the number of test scenes.
- toy: seconds, for tests; the numbers mean nothing.
- small: each experiment in under 15 minutes on 2 quiet CPU cores (not counting the one shared CLIP
  pretraining, cached); small images (128 pixels high), a small CLIP, 600 steps of 8 per model.
  Concessions to so short a run: ground-truth Gaussians of sigma 3 px instead of 1 (a peaky target
  is learnt far more slowly from an 8x8 patch grid; counts are the same), and an easier world (one
  class per scene, 12-24 px shapes, up to 30 per class, no blur or noise). In the default world no
  variant learned to count within this budget (measured, 150 to 900 steps, learning rates 3e-4 to
  3e-3: nearly flat density maps, predicted and true counts correlated 0.1-0.5, NAE 0.87-1.2
  against 0.96 for always answering the training mean, the lowest by predicting near 0
  everywhere), so no comparison meant anything.
- full: for a GPU; the world at its native 384-pixel height, a mid-size CLIP (4000 pretraining
  steps of 256, about 30 minutes on an H200), 6000 training steps of 32 per variant (about 20
  minutes each), 300 test scenes per set.

Seeds: `--seed S` seeds the CLIP pretraining and every training run with S, and the test scenes
with TEST_SEED_BASE + S, so test scenes never come from a training stream.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcount.environment import machine_info

from clipcount.errors import ConfigError

TEST_SEED_BASE = 10_000_000
REPORT_FILE, RESULTS_FILE, LOG_FILE = "report.md", "results.json", "log.txt"


# ---- budgets ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """Everything that sets an experiment's cost. The window is the world's image height."""

    name: str
    # synthetic world (WorldConfig overrides)
    world: dict[str, Any]
    # CLIP architecture (VisionConfig / TextConfig fields) and its synthetic pretraining
    vision: dict[str, Any]
    text: dict[str, Any]
    embed_dim: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_lr: float
    # CLIP-Count sizes (the paper's structure, scaled down)
    visual_tokens: int
    interaction_width: int
    interaction_heads: int
    decoder_channels: tuple[int, ...]
    decoder_groups: int
    # training: steps = epoch_steps * (contrastive_epochs + density_epochs), batch_size each
    batch_size: int
    epoch_steps: int
    contrastive_epochs: int
    density_epochs: int
    lr: float
    workers: int
    density_sigma: float  # ground-truth Gaussian width, pixels (the paper: 1 at 384-pixel windows)
    absent_prob: float  # share of synthetic training prompts naming a class absent from the crop (target 0)
    # evaluation
    test_scenes: int  # synthetic scenes per test set
    fsc_images: int | None  # FSC-147 images evaluated per split (None: all)
    stride: int | None  # window stride (None: a third of the window, the published protocol)
    similarity_images: int  # crops whose patch-text similarity is measured (contrastive)
    latency_repeats: int
    count_bins: tuple[int, ...]  # bin edges of the instance-count sweep (generalisation)
    separations: tuple[float, ...]  # overlap settings of the crowding sweep (generalisation)
    stride_divisors: tuple[int, ...]  # the stride sweep (cost): window // k for each k
    # several prompts per crop, with negatives (TrainConfig fields of the same names; 1, 0 = published)
    prompts_per_image: int = 1
    negative_share: float = 0.0
    hard_negative_share: float = 0.5
    region_weight: float = 0.0  # region-level loss of synthetic CLIP pretraining (synthetic/regions.py)

    @property
    def window(self) -> int:
        return int(self.world["height"])

    def eval_stride(self, window: int | None = None) -> int:
        """The evaluation stride for a model with this window (default: the budget's window)."""
        return int(self.stride or max(1, (window or self.window) // 3))

    @property
    def deep_layers(self) -> int:
        """Prompted layers of the 'deep' setting: the paper prompts 10 of ViT-B/16's 12."""
        return max(1, round(int(self.vision["layers"]) * 10 / 12))

    @property
    def train_steps(self) -> int:
        return self.epoch_steps * (self.contrastive_epochs + self.density_epochs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


BUDGETS: dict[str, Budget] = {
    "toy": Budget(
        name="toy",
        world=dict(height=64, min_width=64, max_width=96, min_size=5.0, max_size=14.0, max_per_class=20),
        vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=dict(context_length=24, width=32, layers=1, heads=2),
        embed_dim=16, pretrain_steps=1, pretrain_batch=4, pretrain_lr=1e-3,
        visual_tokens=2, interaction_width=16, interaction_heads=2, decoder_channels=(16, 8, 8, 8),
        decoder_groups=4,
        batch_size=2, epoch_steps=1, contrastive_epochs=1, density_epochs=1, lr=1e-3, workers=0, density_sigma=1.0,
        absent_prob=0.2, prompts_per_image=2, negative_share=0.5, region_weight=1.0,
        test_scenes=2, fsc_images=2, stride=None, similarity_images=2, latency_repeats=1,
        count_bins=(1, 5, 20), separations=(1.0, 0.0), stride_divisors=(1, 2),
    ),
    "small": Budget(
        name="small",
        # One class per scene (as in most FSC-147 images), shapes of about a patch, no image effects:
        # in the default world (up to 4 classes, 6-28 px, 250 per class) no arm learned to count at
        # this budget (see the module docstring); here the paper's model does (NAE 0.37 vs 0.80).
        world=dict(height=128, min_width=128, max_width=384, min_size=12.0, max_size=24.0, max_per_class=30,
                   classes_per_scene=(1, 1), effects=False),
        vision=dict(image_size=128, patch_size=16, width=96, layers=4, heads=4),
        text=dict(context_length=32, width=64, layers=2, heads=2),
        embed_dim=64, pretrain_steps=400, pretrain_batch=32, pretrain_lr=1e-3,
        visual_tokens=4, interaction_width=64, interaction_heads=4, decoder_channels=(32, 16, 16, 8),
        decoder_groups=4,
        batch_size=8, epoch_steps=30, contrastive_epochs=2, density_epochs=18, lr=1e-3, workers=1, density_sigma=3.0,
        absent_prob=0.2, prompts_per_image=3, negative_share=0.4, hard_negative_share=0.6, region_weight=1.0,
        test_scenes=100, fsc_images=100, stride=None, similarity_images=48, latency_repeats=5,
        # trained on at most 30 per class: the upper bins ask how far counting extrapolates
        count_bins=(1, 4, 11, 31, 61, 121), separations=(1.0, 0.6, 0.35, 0.15, 0.0), stride_divisors=(1, 2, 3, 4),
    ),
    "full": Budget(
        name="full",
        world=dict(height=384, min_width=384, max_width=1024, min_size=8.0, max_size=60.0, max_per_class=250),
        vision=dict(image_size=224, patch_size=16, width=384, layers=8, heads=6),
        text=dict(context_length=77, width=256, layers=6, heads=4),
        embed_dim=256, pretrain_steps=4000, pretrain_batch=256, pretrain_lr=5e-4,
        visual_tokens=10, interaction_width=256, interaction_heads=4, decoder_channels=(256, 128, 64, 32),
        decoder_groups=8,
        batch_size=32, epoch_steps=200, contrastive_epochs=3, density_epochs=27, lr=1e-4, workers=8,
        density_sigma=1.0, absent_prob=0.2, prompts_per_image=4, negative_share=0.4, hard_negative_share=0.6,
        region_weight=1.0,
        test_scenes=300, fsc_images=None, stride=None, similarity_images=200, latency_repeats=20,
        count_bins=(1, 6, 21, 61, 121, 251), separations=(1.0, 0.6, 0.35, 0.15, 0.0),
        stride_divisors=(1, 2, 3, 4),
    ),
}


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ConfigError(f"unknown budget {name!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[name]


# ---- the run context ----------------------------------------------------------------------------

@dataclass
class RunContext:
    """One experiment run: where it writes, what it may reuse, and its seeds."""

    experiment: str
    out: Path
    budget: Budget
    seed: int = 0
    cache: Path | None = None  # shared across experiments: pretrained CLIP, trained variants
    data: str = "synthetic"  # or "fsc147"
    root: Path | None = None  # the FSC-147 folder
    model: Path | None = None  # a trained checkpoint to use as the baseline (where it makes sense)
    clip: str | None = None  # CLIP weights: a synthetic pretraining folder, or real CLIP weights
    device: str | None = None
    progress: bool = True
    command: str = ""
    started: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)  # facts about the run, printed in the report
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> config and training facts
    baseline_count: float | None = None  # the training-mean baseline's answer, once measured

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.cache is None:
            self.cache = self.out.resolve().parent / ".clipcount-experiments-cache"
        self.cache = Path(self.cache)
        if self.data not in ("synthetic", "fsc147"):
            raise ConfigError(f"unknown data {self.data!r}; use synthetic (default) or fsc147")
        if self.data == "fsc147" and self.root is None:
            raise ConfigError("--data fsc147 needs --root DIR, the FSC-147 folder (annotation_FSC147_384.json ...)")

    @property
    def test_seed(self) -> int:
        return TEST_SEED_BASE + self.seed

    @property
    def synthetic(self) -> bool:
        return self.data == "synthetic"

    def log(self, message: str) -> None:
        """Print a progress line and keep it in OUT/log.txt."""
        line = f"[{self.experiment} {time.time() - self.started:7.1f}s] {message}"
        print(line, flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


# ---- reports ------------------------------------------------------------------------------------

@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    note: str = ""

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(format_cell(row.get(c)) for c in self.columns) + " |")
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}


@dataclass
class Section:
    heading: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # PNG file names inside OUT


@dataclass
class Report:
    experiment: str
    title: str
    question: str  # what the seed paper claims or leaves open, in one paragraph
    sections: list[Section] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # sentences computed from the numbers
    results: dict[str, Any] = field(default_factory=dict)  # the raw numbers for results.json


def format_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def write_report(ctx: RunContext, report: Report) -> Path:
    """OUT/report.md and OUT/results.json; returns the report's path."""
    from clipcount.engine.metrics import write_json_atomic
    from clipcount.imaging import atomic_write

    ctx.out.mkdir(parents=True, exist_ok=True)
    seconds = round(time.time() - ctx.started, 1)
    text = render_markdown(ctx, report, seconds)
    with atomic_write(ctx.out / REPORT_FILE, "w", encoding="utf-8") as handle:
        handle.write(text)
    payload = {
        "experiment": report.experiment,
        "title": report.title,
        "question": report.question,
        "findings": report.findings,
        "results": report.results,
        "tables": [t.to_dict() for s in report.sections for t in s.tables],
        "plots": [p for s in report.sections for p in s.plots],
        "run": run_facts(ctx, seconds),
        "variants": ctx.variants,
        "machine": machine_info(),
    }
    write_json_atomic(payload, ctx.out / RESULTS_FILE)
    ctx.log(f"wrote {ctx.out / REPORT_FILE} and {ctx.out / RESULTS_FILE}")
    return ctx.out / REPORT_FILE


def run_facts(ctx: RunContext, seconds: float) -> dict[str, Any]:
    return {
        "command": ctx.command,
        "budget": ctx.budget.to_dict(),
        "seed": ctx.seed,
        "train_seed": ctx.seed,
        "clip_pretrain_seed": ctx.seed,
        "test_seed": ctx.test_seed,
        "data": ctx.data,
        "root": str(ctx.root) if ctx.root else None,
        "model": str(ctx.model) if ctx.model else None,
        "clip": ctx.clip,
        "cache": str(ctx.cache),
        "seconds": seconds,
        "notes": ctx.notes,
    }


def render_markdown(ctx: RunContext, report: Report, seconds: float) -> str:
    data = "the synthetic world" if ctx.synthetic else f"FSC-147 at {ctx.root}"
    parts = [
        f"# {report.title}",
        "",
        f"`clipcount experiments {report.experiment}`, budget **{ctx.budget.name}**, seed **{ctx.seed}**, "
        f"on {data}; {seconds:.0f} s in all.",
        "",
        "## Question",
        "",
        report.question,
        "",
    ]
    if report.findings:
        parts += ["## Findings", ""] + [f"- {f}" for f in report.findings] + [""]
    for section in report.sections:
        parts += [f"## {section.heading}", ""]
        if section.text:
            parts += [section.text, ""]
        for table in section.tables:
            parts += [table.markdown(), ""]
        for plot in section.plots:
            parts += [f"![{plot}]({plot})", ""]
    parts += reproduce_section(ctx)
    return "\n".join(parts).rstrip() + "\n"


def reproduce_section(ctx: RunContext) -> list[str]:
    """Seeds, command, budget and each variant's configuration: what a rerun needs."""
    lines = ["## Seeds and configuration", "",
             f"- command: `{ctx.command or '(called from Python)'}`",
             f"- seeds: training {ctx.seed}, CLIP pretraining {ctx.seed}, test scenes {ctx.test_seed}",
             f"- device: {ctx.device or 'auto'}; cache: `{ctx.cache}`"]
    lines += [f"- {note}" for note in ctx.notes]
    lines += ["", "Budget:", "", "```json", compact_json(ctx.budget.to_dict()), "```", ""]
    for label, facts in ctx.variants.items():
        lines += [f"Variant `{label}`:", "", "```json", compact_json(facts), "```", ""]
    return lines


def compact_json(data: dict[str, Any]) -> str:
    """A dict as JSON with one line per top-level key (short enough to read, exact enough to reuse)."""
    body = ",\n".join(f" {json.dumps(str(k))}: {json.dumps(v, default=str)}" for k, v in data.items())
    return "{\n" + body + "\n}"


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "clipcount " + " ".join(shlex.quote(a) for a in args)


def percent_change(old: float, new: float) -> str:
    """'-23%' style change from old to new ('n/a' when undefined)."""
    if not (math.isfinite(old) and math.isfinite(new)) or old == 0:
        return "n/a"
    return f"{100.0 * (new - old) / abs(old):+.0f}%"
