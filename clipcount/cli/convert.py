"""`clipcount convert-official`: the published CLIP-Count checkpoint -> a clipcount checkpoint."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  clipcount convert-official clipcount_pretrained.ckpt weights/clip-count-published
  clipcount count photo.jpg -p apples --model weights/clip-count-published
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-official",
        help="convert the published CLIP-Count .ckpt to clipcount's format",
        description="Read the published PyTorch Lightning checkpoint (weights only, nothing unpickled beyond "
        "tensors) and write safetensors + config.json with the compatibility switch on.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", help="the published .ckpt file")
    parser.add_argument("out", help="folder to write the clipcount checkpoint to")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipcount.modeling.official import convert_official

    out = convert_official(args.ckpt, args.out)
    print(f"wrote {out} (compat mode: reproduces the published model, including its known bugs)")
    return 0
