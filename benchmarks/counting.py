"""The prompt-fidelity benchmark of the synthetic world (a thin command line around
`clipcount.synthetic.benchmark`, where the logic lives so the installed package has it too):

    python benchmarks/counting.py --model CKPT [--ablations DIR ...] [--seed S] [--n N] [--out results.json]

Rows (seen, shape-only, singular, template, held-out, minority, absent class, blank image) and
baselines (training mean, class-agnostic count, shape-blind and colour-blind perfect counters) are
described in that module. Prints one table and the bundled model's targets; writes JSON with every
image's prompt, true and predicted count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipcount.synthetic.benchmark import DEFAULT_N, DEFAULT_SEED, format_targets, run_benchmark  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/counting.py",
        description="Count freshly generated synthetic test scenes with a checkpoint (and ablations) "
        "and print MAE/RMSE/NAE and mean predicted counts against two baselines.",
    )
    parser.add_argument("--model", required=True, help="clipcount checkpoint folder or model name, e.g. demo (the main model)")
    parser.add_argument("--ablations", nargs="*", default=[], metavar="DIR",
                        help="more checkpoint folders, each reported under its folder name")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"test seed (default {DEFAULT_SEED})")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"scenes per set (default {DEFAULT_N})")
    parser.add_argument("--stride", type=int, default=128, help="window stride (default 128)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--train-mean", type=float, default=None,
                        help="the training-mean baseline's answer (default: from the checkpoint's config)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    from clipcount.errors import ClipCountError

    args = build_parser().parse_args(argv)
    models: dict[str, Any] = {"main": args.model}
    for folder in args.ablations:
        label = Path(folder).name if Path(folder).name not in ("final", "last") else Path(folder).parent.name
        models[label] = folder
    try:
        payload = run_benchmark(models, args.seed, args.n, args.stride, args.device, args.precision,
                                args.train_mean, args.out, progress=not args.quiet)
    except ClipCountError as error:
        print(f"counting benchmark: error: {error}", file=sys.stderr)
        return 2
    print(format_targets(payload["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
