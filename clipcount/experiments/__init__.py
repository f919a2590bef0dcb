"""The paper's experiments and its open questions, one command each.

    clipcount experiments NAME --out DIR [--budget toy|small|full] [--seed S | --seeds 0,1,2]
                          [--data fsc147 --root DIR] [--model CKPT] [--clip DIR]

Each writes DIR/report.md (tables, PNG plots, findings, seeds and configuration) and
DIR/results.json. On the synthetic world by default; on FSC-147 with `--data fsc147`. With
`--seeds`, each seed's run goes to DIR/seed-S and DIR/report.md shows the tables as mean ± std
(seeds.py).

    contrastive     with and without the patch-text contrastive stage
    scales          the interaction module with 1, 2 (the paper) and 3 scales
    tuning          deep / shallow / no visual prompts, and full fine-tuning of the image tower
    specificity     the same scenes counted with prompts of different specificity
    generalisation  seen, held-out and unseen-word classes; error against count and crowding
    cost            accuracy against FLOPs and latency (interaction scales, window stride)
"""

from __future__ import annotations

import importlib
from pathlib import Path

from clipcount.errors import ConfigError
from clipcount.experiments.common import BUDGETS, RunContext, get_budget, write_report

EXPERIMENTS: dict[str, str] = {
    "contrastive": "with and without the patch-text contrastive stage (same budget)",
    "scales": "the interaction module with 1, 2 (the paper) and 3 scales: error per object size, FLOPs",
    "tuning": "deep, shallow and no visual prompts, and full fine-tuning of the image encoder",
    "specificity": "the same scenes counted with prompts of different specificity",
    "generalisation": "seen vs held-out vs unseen-word classes; error against count and crowding",
    "cost": "accuracy against FLOPs and latency for the interaction variants and the window stride",
}


def run_experiment(
    name: str,
    out: str | Path,
    budget: str = "small",
    seed: int = 0,
    data: str = "synthetic",
    root: str | Path | None = None,
    model: str | Path | None = None,
    clip: str | None = None,
    cache: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    command: str = "",
) -> Path:
    """Run one experiment end to end; returns the path of its report.md."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    ctx = RunContext(
        experiment=name, out=Path(out), budget=get_budget(budget), seed=int(seed),
        cache=Path(cache) if cache else None, data=data, root=Path(root) if root else None,
        model=Path(model) if model else None, clip=clip, device=device, progress=progress, command=command,
    )
    module = importlib.import_module(f"clipcount.experiments.{name}")
    ctx.log(f"budget {ctx.budget.name}, seed {ctx.seed}, data {ctx.data}, out {ctx.out}, cache {ctx.cache}")
    report = module.run(ctx)
    return write_report(ctx, report)


__all__ = ["BUDGETS", "EXPERIMENTS", "RunContext", "run_experiment"]
