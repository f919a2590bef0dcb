"""`clipcount experiments NAME --out DIR`: the paper's experiments and its open questions."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  # on the synthetic world, in under 15 minutes each on 2 CPU cores (one shared CLIP pretraining first)
  clipcount experiments contrastive --out runs/exp/contrastive --budget small
  clipcount experiments scales --out runs/exp/scales --budget small

  # three seeds: each seed's report in OUT/seed-S, tables as mean ± std in OUT/report.md
  clipcount experiments contrastive --out runs/exp/contrastive-3 --budget small --seeds 0,1,2

  # the full preset, for a GPU
  clipcount experiments tuning --out runs/exp-full/tuning --budget full --device cuda

  # on FSC-147 with real CLIP weights
  clipcount experiments generalisation --out runs/fsc/gen --data fsc147 --root data/FSC147 \\
      --clip openai/clip-vit-base-patch16 --budget full

  # a trained checkpoint as the baseline of the evaluation-only experiments
  clipcount experiments specificity --out runs/exp/spec --model runs/synth/model

Each run writes OUT/report.md, OUT/results.json and PNG plots. The pretrained CLIP and the trained
variants are cached (default: a .clipcount-experiments-cache folder beside OUT), so experiments that
share a model train it once.
"""


def register(subparsers) -> None:
    from clipcount.experiments import EXPERIMENTS

    listing = "\n".join(f"  {name:<15} {text}" for name, text in EXPERIMENTS.items())
    parser = subparsers.add_parser(
        "experiments",
        help="rerun the paper's experiments and open questions (report.md, results.json, plots)",
        description="Run one experiment end to end and write a report with tables and plots.\n\nexperiments:\n"
        + listing,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=list(EXPERIMENTS), metavar="NAME", help="which experiment (see above)")
    parser.add_argument("--out", required=True, help="folder for report.md, results.json and the plots")
    parser.add_argument("--budget", default="small", choices=("toy", "small", "full"),
                        help="toy: seconds (tests); small: < 15 min on 2 CPU cores (default); full: a GPU")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="training and CLIP pretraining seed (default 0); "
                       "test scenes use 10000000 + seed")
    seeds.add_argument("--seeds", metavar="LIST", help="several seeds, e.g. 0,1,2 or 0-4: each seed's report in "
                       "OUT/seed-S, and OUT/report.md with every table as mean ± std over the seeds")
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "fsc147"),
                        help="the synthetic world (default) or FSC-147 (needs --root)")
    parser.add_argument("--root", help="the FSC-147 folder, with --data fsc147")
    parser.add_argument("--model", metavar="CKPT",
                        help="a trained clipcount checkpoint as the baseline (specificity, generalisation, cost)")
    parser.add_argument("--clip", metavar="DIR",
                        help="CLIP to build on: a synthetic pretraining folder (clipcount synthetic pretrain-clip) "
                        "or real CLIP weights (file, Hugging Face folder or hub id); default: pretrain a synthetic "
                        "CLIP at the budget, cached")
    parser.add_argument("--cache", metavar="DIR", help="where pretrained CLIPs and trained variants are cached "
                        "(default: OUT/../.clipcount-experiments-cache)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipcount.experiments import run_experiment
    from clipcount.experiments.common import command_line

    options = dict(budget=args.budget, data=args.data, root=args.root, model=args.model, clip=args.clip,
                   device=args.device, progress=not args.no_progress, command=command_line(None))
    if args.seeds is None:
        report = run_experiment(args.name, args.out, seed=args.seed, cache=args.cache, **options)
    else:
        from pathlib import Path

        from clipcount.experiments.seeds import parse_seeds, run_seeds

        out = Path(args.out)
        # the cache a single run with --out OUT would use, so that seed runs share it with single runs
        cache = args.cache or out.resolve().parent / ".clipcount-experiments-cache"
        report = run_seeds(lambda seed, folder: run_experiment(args.name, folder, seed=seed, cache=cache, **options),
                           out, parse_seeds(args.seeds))
    print(f"report: {report}")
    return 0
