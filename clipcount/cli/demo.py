"""`clipcount demo`: count two prompts in the bundled example scene with the bundled model.

It is `clipcount count` on the example with fixed prompts and an overlay folder, plus the true
counts of the example (recorded beside the bundled model) so the numbers can be judged.
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PROMPTS = ("red circles", "green triangles")  # a class seen in training and a held-out one

EXAMPLES = """examples:
  clipcount demo
  clipcount demo --out my-demo -p "yellow stars" -p "blue squares"
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="count two prompts in the bundled example with the bundled model",
        description="Count objects in the bundled synthetic example scene with the bundled demo model, "
        "print predicted and true counts, and write density overlays.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-p", "--prompt", action="append", metavar="PROMPT",
                        help=f"what to count (default: {', '.join(DEFAULT_PROMPTS)})")
    parser.add_argument("--out", default="clipcount-demo", help="folder for the overlays (default clipcount-demo)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipcount.cli.count import run as run_count
    from clipcount.imaging import ImageLimits, check_writable
    from clipcount.models import REGISTRY, resolve_model

    check_writable(args.out, "--out", folder=True)
    folder = resolve_model("demo")
    example = REGISTRY["demo"].folder.parent / "example.jpg"
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    count_args = argparse.Namespace(
        inputs=[str(example)], prompt=prompts, json=None, csv=None, overlay=args.out, resume=False,
        overwrite=False, model="demo", stride=None, device=args.device, precision="auto",
        max_pixels=ImageLimits().max_pixels, quiet=False,
    )
    code = run_count(count_args)
    truth = json.loads((folder / "config.json").read_text()).get("example", {}).get("counts", {})
    for prompt in prompts:
        if prompt in truth:
            print(f"true count of {prompt!r} in the example: {truth[prompt]}")
    print(f"overlays written to {args.out}/", file=sys.stderr)
    return code
