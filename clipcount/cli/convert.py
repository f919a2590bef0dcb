"""`clipcount convert-official`: the published CLIP-Count checkpoint -> a clipcount checkpoint."""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  clipcount convert-official clipcount_pretrained.ckpt weights/clip-count-published
  clipcount convert-official clipcount_pretrained.ckpt weights/clip-count-published --clip ViT-B-16.pt
  clipcount convert-official clipcount_pretrained.ckpt weights/clip-count-published --clip clip-vit-base-patch16/
  clipcount count photo.jpg -p apples --model weights/clip-count-published

The released file holds no CLIP weights (the published code drops them when saving); they come from
--clip, by default OpenAI's release for the checkpoint's backbone from the Hugging Face hub
(openai/clip-vit-base-patch16), downloaded once. Offline, download it by hand and pass it with --clip.
`clipcount count --model published` does all of this itself on first use.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-official",
        help="convert the published CLIP-Count .ckpt to clipcount's format",
        description="Read the published PyTorch Lightning checkpoint (weights only, nothing unpickled beyond "
        "tensors and hyper-parameters) and write safetensors + config.json with the compatibility switch on. "
        "The architecture (attention heads, prompt sizes, backbone) is read from its hyper_parameters.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ckpt", help="the published .ckpt file")
    parser.add_argument("out", help="folder to write the clipcount checkpoint to")
    parser.add_argument("--clip", metavar="SOURCE",
                        help="CLIP weights for a checkpoint without them: OpenAI .pt, Hugging Face folder or hub id, "
                        "OpenCLIP file (default: OpenAI's release for the checkpoint's backbone, "
                        "e.g. openai/clip-vit-base-patch16)")
    parser.add_argument("--clip-activation", choices=("quick_gelu", "gelu"), default=None,
                        help="the CLIP's MLP activation when --clip is a bare weights file (default: quick_gelu, "
                        "OpenAI's); folders say it in their config")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipcount.modeling.official import convert_official

    def note(message: str) -> None:
        print(f"clipcount: {message}", file=sys.stderr)

    out = convert_official(args.ckpt, args.out, clip=args.clip, clip_activation=args.clip_activation, say=note)
    print(f"wrote {out} (compat mode: reproduces the published model, including its known bugs, "
          "and counts with the published windowing by default)")
    return 0
