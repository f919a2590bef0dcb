"""`clipcount synthetic ...`: the procedural counting world from the command line.

    clipcount synthetic make-dataset OUT --n N ...     write scenes in the FSC-147 layout
    clipcount synthetic pretrain-clip OUT ...          pretrain a small CLIP on scene captions
    clipcount synthetic recipe OUT [--preset full]     CLIP, CLIP-Count, ablations and benchmark
    clipcount synthetic export-demo RUN [ASSETS]       bundle a recipe's model as the demo model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

STAGE_HELP = "pretrain, main, ablations, benchmark"
# the keys of `synthetic.presets.PRESETS`, written out so `--help` imports no torch (a test checks they agree)
PRESET_NAMES = ("cpu", "cpu-patch", "cpu-stem", "full", "small", "toy")


def register(subparsers) -> None:
    from clipcount.synthetic.dataset import add_cli

    sub = add_cli(subparsers)  # adds `synthetic` with `make-dataset`; returns its subparsers
    _add_recipe(sub)
    _add_pretrain(sub)
    _add_export(sub)


def _add_recipe(sub) -> None:
    parser = sub.add_parser(
        "recipe",
        help="train and measure the whole method on synthetic scenes (CLIP, CLIP-Count, ablations, benchmark)",
        description="Pretrain a small CLIP on synthetic scene captions, train CLIP-Count on it, train three "
        "ablations with the same budget and benchmark them all on fresh test scenes. Resumable: run the same "
        "command again after an interruption.",
        epilog="presets: cpu = 2 CPU cores, at most 60 minutes (the bundled demo model's recipe; cpu-patch and "
        "cpu-stem are earlier versions of it, kept for comparison); "
        "full = one GPU and 16 CPU cores, about 8 minutes; small = 2 CPU cores, under 20 minutes (proves the "
        "recipe runs, does not count well).",
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="run folder (created; reused to resume)")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="cpu", help="budget (default cpu)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--stages", default=",".join(("pretrain", "main", "ablations", "benchmark")),
                        help=f"comma-separated stages to run (default all: {STAGE_HELP})")
    parser.add_argument("--fresh", action="store_true", help="delete earlier results in OUT instead of resuming")
    parser.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                        help="multiply the preset's training time budgets by X (default 1; e.g. 0.8 for a "
                        "shorter slot); resume with the same value")
    parser.add_argument("--export-demo", type=Path, default=None, metavar="ASSETS",
                        help="afterwards, copy the main model into ASSETS/demo and render ASSETS/example.jpg")
    parser.add_argument("--reuse-clip", type=Path, default=None, metavar="RUN",
                        help="start from the finished CLIP stage of recipe run RUN (same preset) and train only "
                        "CLIP-Count: to compare seeds or settings on one CLIP in half the time")
    parser.add_argument("--seed", type=int, default=None,
                        help="CLIP-Count's data and initialisation seed (default: the preset's, 0); the CLIP "
                        "stages keep theirs; resume with the same value")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_recipe_command)


def _add_pretrain(sub) -> None:
    parser = sub.add_parser(
        "pretrain-clip",
        help="pretrain a small CLIP contrastively on synthetic (crop, caption) pairs",
        description="Pretrain the CLIP of a recipe preset on 384x384 crops of training scenes and captions "
        "naming the classes and counts inside each crop. Held-out classes are never shown. Resumable.",
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="output folder (final/ holds the weights)")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="cpu",
                        help="architecture and budget of this recipe preset (default cpu)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    parser.add_argument("--workers", type=int, default=None, help="data worker processes (default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="data and initialisation seed (default 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_pretrain_command)


def _add_export(sub) -> None:
    parser = sub.add_parser(
        "export-demo",
        help="copy a recipe run's model into the package as the bundled demo model",
        description="Write ASSETS/demo/{model.safetensors,config.json} (float16 weights) from RUN/main/final "
        "and render the example scene ASSETS/example.jpg.",
    )
    parser.add_argument("run", metavar="RUN", type=Path, help="a recipe run folder (or a checkpoint folder)")
    parser.add_argument("assets", metavar="ASSETS", type=Path, nargs="?", default=None,
                        help="assets folder (default: clipcount's own package assets)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    parser.set_defaults(func=run_export_command)


def run_recipe_command(args: argparse.Namespace) -> int:
    from clipcount.errors import ConfigError
    from clipcount.synthetic.recipe import STAGES, export_demo, get_preset, run_recipe

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if not stages or set(stages) - set(STAGES):
        raise ConfigError(f"--stages takes a comma-separated list of {STAGE_HELP}; got {args.stages!r}")
    preset = get_preset(args.preset)
    if args.seed is not None:
        preset = dataclasses.replace(preset, train=dataclasses.replace(preset.train, seed=args.seed))
    result = run_recipe(args.out, preset, device=args.device, resume=not args.fresh,
                        progress=not args.quiet, stages=stages, time_scale=args.time_scale,
                        reuse_clip=args.reuse_clip)
    for row, check in result.get("targets", {}).items():
        verdict = "met" if check["met"] else "not met"
        print(f"target {row}: {check['measure']} {check['value']:.3f} (<= {check['target']}, 4x below the training "
              f"mean's {check['baseline']:.3f}): {verdict}")
    if "benchmark" in stages:
        print(f"report: {args.out / 'report.json'}")
    if args.export_demo is not None:
        _print_export(export_demo(args.out, args.export_demo))
    return 0


def run_pretrain_command(args: argparse.Namespace) -> int:
    from clipcount.synthetic.pretrain import load_clip, pretrain_clip, zero_shot_accuracy
    from clipcount.synthetic.recipe import get_preset

    preset = get_preset(args.preset)
    changes = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size),
                                 ("num_workers", args.workers), ("seed", args.seed)) if v is not None}
    cfg = dataclasses.replace(preset.pretrain, world={**preset.world, **preset.pretrain.world}, **changes)
    result = pretrain_clip(preset.clip, cfg, args.out, resume=not args.fresh, device=args.device,
                           progress=not args.quiet)
    accuracy = zero_shot_accuracy(load_clip(result.final), n=preset.zero_shot_n, crop_size=cfg.crop_size)
    print(f"wrote {result.final} after {result.step} steps; zero-shot class accuracy (chance 0.03): "
          f"seen {accuracy['seen']:.2f}, held-out {accuracy['held_out']:.2f}")
    return 0


def run_export_command(args: argparse.Namespace) -> int:
    from clipcount.models import ASSETS
    from clipcount.synthetic.recipe import export_demo

    _print_export(export_demo(args.run, args.assets or ASSETS, dtype=args.dtype))
    return 0


def _print_export(info: dict) -> None:
    print(f"wrote {info['folder']} ({info['bytes'] / 1e6:.1f} MB) and {info['example']}; "
          f"true counts in the example: {json.dumps(info['counts'])}")
