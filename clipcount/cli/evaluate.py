"""`clipcount eval`: score a model on a counting dataset with the published window protocol."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  clipcount eval --model weights/clip-count-published --dataset fsc147 --root data/FSC147 --split val
  clipcount eval --model weights/clip-count-published --dataset fsc147 --root data/FSC147 --split test --out results/fsc-test
  clipcount eval --model runs/fsc147/final --dataset fsc147-s --root data/FSC147 --subset FSC-147-S-v2.json
  clipcount eval --model runs/fsc147/final --dataset carpk --root data/CARPK
  clipcount eval --model runs/fsc147/final --dataset shanghaitech --part A --root data/ShanghaiTech
  clipcount eval --model runs/fsc147/final --dataset folder --root my_photos --annotations points.csv

Prints MAE, RMSE, NAE and SRE (and published scores where known). With --out: predictions.csv
(image, prompt, gt, predicted, error) and summary.json (overall and per-class metrics).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        aliases=["evaluate"],
        help="evaluate a model on FSC-147, FSC-147-S, CARPK, ShanghaiTech or your own folder",
        description="Count every image of a dataset split (each resized to the model's image height and "
        "counted window by window) and report MAE, RMSE, NAE and SRE, overall and per class.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="clipcount checkpoint folder, hub id, or model name (demo, or published: the released "
                        "CLIP-Count, downloaded and converted on first use)")
    parser.add_argument("--dataset", required=True,
                        help="fsc147, fsc147-s, carpk, shanghaitech (with --part), shanghaitech-a, shanghaitech-b, folder")
    parser.add_argument("--root", required=True,
                        help="the dataset's folder (for fsc147-s: the FSC-147 folder or its images_384_VarV2)")
    parser.add_argument("--split", default=None, help="split to evaluate (default: test; FSC-147 also has val, "
                        "val_coco, test_coco)")
    parser.add_argument("--part", choices=("A", "B", "a", "b"), help="ShanghaiTech part")
    parser.add_argument("--subset", metavar="JSON", help="FSC-147-S subset file (default: FSC-147-S-v2.json found "
                        "beside the images)")
    parser.add_argument("--annotations", help="points file for --dataset folder")
    parser.add_argument("--stride", type=int, default=None,
                        help="pixels between windows (default: a third of the window, 128 for 384 as published)")
    parser.add_argument("--windowing", choices=("clipcount", "published"), default=None,
                        help="how whole images are cut into windows and blended: clipcount's, or the published "
                        "evaluation's (zero padding to a multiple of the stride, sigmoid blending); default: the "
                        "model's (published for converted published checkpoints)")
    parser.add_argument("--out", help="folder for predictions.csv and summary.json")
    parser.add_argument("--skip-bad", action="store_true", help="skip unreadable or inconsistent images with a warning")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--batch", type=int, default=64, help="windows per forward pass (default 64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from clipcount.cli.count import add_image_options

    add_image_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clipcount.cli.count import _note, image_limits
    from clipcount.data import build_dataset
    from clipcount.engine.evaluate import evaluate
    from clipcount.models import DEMO_NOTE, is_synthetic_only, resolve_model
    from clipcount.modeling.checkpoint import load_model

    from clipcount.errors import ConfigError

    if args.batch < 1:
        raise ConfigError(f"--batch must be at least 1 window, not {args.batch}")
    if args.stride is not None and args.stride < 1:
        raise ConfigError(f"--stride must be a positive number of pixels, not {args.stride}")
    name, kwargs = dataset_arguments(args)
    if args.out:
        from clipcount.imaging import check_writable

        check_writable(args.out, "--out", folder=True)
    limits = image_limits(args)
    dataset = build_dataset(name, args.root, split=args.split or "test", **kwargs)
    dataset.max_pixels = limits.max_pixels
    model = load_model(resolve_model(args.model))
    device = None if args.device == "auto" else args.device
    report = evaluate(model, dataset, stride=args.stride, out_dir=args.out, progress=not args.no_progress,
                      device=device, precision=args.precision, max_batch=args.batch, skip_bad=args.skip_bad,
                      windowing=args.windowing)
    print(report.table())
    if report.summary_json is not None:
        print(f"wrote {report.predictions_csv} and {report.summary_json}")
    if is_synthetic_only(args.model):
        _note(DEMO_NOTE, args)
    return 0


def dataset_arguments(args: argparse.Namespace) -> tuple[str, dict]:
    """The dataset name for build_dataset and its reader's keyword arguments."""
    from clipcount.errors import ConfigError

    name = args.dataset.strip().lower().replace("_", "-")
    if name == "shanghaitech":
        if not args.part:
            raise ConfigError("--dataset shanghaitech needs --part A or --part B")
        name = f"shanghaitech-{args.part.lower()}"
    elif args.part and not name.startswith("shanghaitech"):
        raise ConfigError("--part is for ShanghaiTech only")
    kwargs: dict = {"skip_bad": args.skip_bad}
    if args.subset:
        if name != "fsc147-s":
            raise ConfigError("--subset is for --dataset fsc147-s only")
        kwargs["subset_json"] = args.subset
    if args.annotations:
        if name != "folder":
            raise ConfigError("--annotations is for --dataset folder only")
        kwargs["annotations"] = args.annotations
    return name, kwargs
