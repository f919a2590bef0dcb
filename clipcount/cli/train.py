"""`clipcount train`: two-stage CLIP-Count training on a counting dataset, resumable, multi-GPU ready."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  # the published recipe on FSC-147 (CLIP ViT-B/16 from the Hugging Face hub)
  clipcount train --dataset fsc147 --root data/FSC147 --out runs/fsc147 --clip openai/clip-vit-base-patch16

  # continue it after an interruption (same command plus --resume)
  clipcount train --dataset fsc147 --root data/FSC147 --out runs/fsc147 --resume

  # 4 GPUs on one machine (--batch-size is the global batch, split between processes)
  torchrun --nproc_per_node 4 -m clipcount train --dataset fsc147 --root data/FSC147 --out runs/ddp \\
      --clip openai/clip-vit-base-patch16

  # settings from a file (sections `model:` = ClipCountConfig, `train:` = TrainConfig); flags win
  clipcount train --dataset fsc147 --root data/FSC147 --out runs/exp1 --config exp1.yaml --lr 5e-5

  # fine-tune a checkpoint on CARPK's training split
  clipcount train --dataset carpk --split train --root data/CARPK --out runs/carpk --init runs/fsc147/final

  # a seconds-long smoke test with a tiny random model
  clipcount train --dataset fsc147 --root data/FSC147 --out /tmp/smoke --tiny --max-steps 5 --batch-size 2

Outputs in --out: last/ (model + trainer state, for --resume), final/ (the model, for
`clipcount eval --model RUN/final`), metrics.jsonl, and tensorboard/ when TensorBoard is installed.
"""

# flag name -> TrainConfig field, for the flags that override the config file
_OVERRIDES = {
    "contrastive_epochs": "contrastive_epochs",
    "density_epochs": "density_epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "max_steps": "max_steps",
    "max_seconds": "max_seconds",
    "ema_decay": "ema_decay",
    "workers": "num_workers",
    "checkpoint_every": "checkpoint_every",
    "log_every": "log_every",
    "seed": "seed",
    "precision": "precision",
    "contrastive_weight": "contrastive_weight",
    "contrastive_weight_stage2": "contrastive_weight_stage2",
    "density_sigma": "density_sigma",
    "prompts_per_image": "prompts_per_image",
    "negative_share": "negative_share",
    "hard_negative_share": "hard_negative_share",
    "background_share": "background_share",
    "count_weight": "count_weight",
    "empty_count_weight": "empty_count_weight",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train CLIP-Count (contrastive stage, then density stage)",
        description="Train CLIP-Count: first the patch-text contrastive loss only, then the density loss. "
        "Checkpoints are written whole (never half) and --resume continues exactly where a run stopped. "
        "Under torchrun it trains on every process with DistributedDataParallel.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True,
                      help="fsc147, carpk, shanghaitech-a, shanghaitech-b or folder (needs point annotations)")
    data.add_argument("--root", required=True, help="the dataset's folder")
    data.add_argument("--split", default="train", help="which split to train on (default: train)")
    data.add_argument("--annotations", help="points file for --dataset folder (default: ROOT/annotations.json|csv)")
    data.add_argument("--skip-bad", action="store_true", help="skip unreadable or inconsistent images with a warning")

    model = parser.add_argument_group("model")
    model.add_argument("--out", required=True, help="run folder for checkpoints and logs")
    model.add_argument("--config", help="YAML or JSON file with `model:` and/or `train:` sections")
    model.add_argument("--clip", metavar="WEIGHTS",
                       help="CLIP weights to start from: an OpenAI/OpenCLIP file, a Hugging Face folder or hub id "
                       "(e.g. openai/clip-vit-base-patch16)")
    model.add_argument("--clip-activation", choices=("quick_gelu", "gelu"), default=None,
                       help="the CLIP's MLP activation when --clip is a bare weights file, which cannot say it: "
                       "quick_gelu (OpenAI's CLIP, the default) or gelu (OpenCLIP's own models, e.g. LAION's); "
                       "folders say it in their config")
    model.add_argument("--init", metavar="MODEL",
                       help="fine-tune this model: a model name (demo), clipcount checkpoint folder or hub id; "
                       "uses the fine-tuning defaults below")
    model.add_argument("--keep-head", action="store_true",
                       help="with --init: keep the model's own density output layer (default: start it afresh, "
                       "linear, so that empty background learns to count 0 within a short fine-tune)")
    model.add_argument("--tune-prompts", action="store_true",
                       help="with --init: train the image tower's visual prompts too (default: keep them; faster)")
    model.add_argument("--text-similarity", action="store_true",
                       help="a new model's decoder also sees the patch-text similarity map (not in the published "
                       "model; see ClipCountConfig.text_similarity)")
    model.add_argument("--image-height", type=int, default=None, metavar="PIXELS",
                       help="a new model's images are resized to PIXELS tall and cut into windows in rows and "
                       "columns (default: the window size, one row; see ClipCountConfig.image_height)")
    model.add_argument("--resume", action="store_true", help="continue from OUT/last (starts fresh if there is none)")
    model.add_argument("--tiny", action="store_true",
                       help="a tiny random model (smoke tests; no --clip needed); a `model:` section adjusts it")

    train = parser.add_argument_group(
        "training (override the config file; defaults: the published recipe from scratch, and with --init the "
        "fine-tuning defaults: " + _finetune_defaults_text() + ")")
    train.add_argument("--contrastive-epochs", type=int, help="epochs of the contrastive stage (20)")
    train.add_argument("--density-epochs", type=int, help="epochs of the density stage (180)")
    train.add_argument("--batch-size", type=int, help="global batch size (32)")
    train.add_argument("--lr", type=float, help="AdamW learning rate (1e-4)")
    train.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.05)")
    train.add_argument("--contrastive-weight", type=float, help="weight of the contrastive loss in stage 1 (1)")
    train.add_argument("--contrastive-weight-stage2", type=float,
                       help="weight of the contrastive loss added in the density stage (0)")
    train.add_argument("--density-sigma", type=float,
                       help="pixels: blur of each point in the target density maps (1)")
    train.add_argument("--prompts-per-image", type=int,
                       help="prompts per training image, each with its own target (1 = published; try 3 with "
                       "--negative-share so that the model has to read the prompt)")
    train.add_argument("--negative-share", type=float,
                       help="chance that each extra prompt names a class absent from the image, with an all-zero "
                       "target (0); on FSC-147 such a class may be present but unannotated: keep it moderate")
    train.add_argument("--hard-negative-share", type=float,
                       help="share of negatives taken from the class names nearest the image's own by text "
                       "embedding (0.5)")
    train.add_argument("--background-share", type=float,
                       help="chance that a training crop is a part of its image with no annotated object (all-zero "
                       "target), so that empty background learns to count 0 (0; 0.25 with --init)")
    train.add_argument("--count-weight", type=float,
                       help="weight of a count loss ((predicted - true)^2) beside the density MSE, which "
                       "cannot see a faint floor of density that adds objects to every image (0)")
    train.add_argument("--empty-count-weight", type=float,
                       help="weight of the squared predicted count of prompts and crops with nothing to count "
                       "(negative prompts, background crops) beside the density MSE (0; e.g. 1e-5)")
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all")
    train.add_argument("--max-seconds", type=float,
                       help="stop after this many seconds of training in all (summed over --resume calls)")
    train.add_argument("--ema-decay", type=float,
                       help="keep a moving average of the trained weights (e.g. 0.998) and save it as the "
                       "final model; last/ keeps the raw weights (0: none, as published)")
    train.add_argument("--workers", type=int, help="data loading processes (2)")
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (500)")
    train.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines (10)")
    train.add_argument("--seed", type=int, help="random seed (0)")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="auto: bf16 on a GPU, fp32 on the CPU")
    train.add_argument("--device", help="cpu, cuda or cuda:N (default: this process's GPU if any)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from clipcount.data import TrainingDataset, build_dataset
    from clipcount.data.augment import AugmentConfig
    from clipcount.engine.distributed import current_context, shutdown
    from clipcount.engine.head_init import start_density_head
    from clipcount.engine.run_folder import LAST, find_checkpoint
    from clipcount.engine.train import train
    from clipcount.errors import ConfigError

    if args.dataset.strip().lower().replace("_", "-") == "fsc147-s":
        raise ConfigError("FSC-147-S has counts only, no object points, so it cannot train a density map; "
                          "evaluate on it with `clipcount eval --dataset fsc147-s`")
    from clipcount.imaging import check_writable

    check_writable(args.out, "--out", folder=True)  # before any work, not at the first checkpoint
    earlier_run = find_checkpoint(Path(args.out), LAST) is not None
    if earlier_run and not args.resume:
        raise ConfigError(f"{args.out} already holds a training run; add --resume to continue it, or choose another --out")
    model_section, train_section = read_config_file(args.config) if args.config else ({}, {})
    cfg = make_train_config({**(_finetune_defaults() if args.init else {}), **train_section}, args)
    torch.manual_seed(cfg.seed)  # the initial weights of the new parts are then reproducible
    model = make_model(args, model_section)
    if args.init and not args.tune_prompts:
        keep_visual_prompts(model)
    extra = {"annotations": args.annotations} if args.annotations else {}
    base = build_dataset(args.dataset, args.root, split=args.split, skip_bad=args.skip_bad, **extra)
    augment = AugmentConfig(mosaic_prob=cfg.mosaic_prob, augment_prob=cfg.augment_prob)
    dataset = TrainingDataset(base, crop_size=model.config.window_size, augment_cfg=augment,
                              density_sigma=cfg.density_sigma, density_scale=model.config.density_scale, seed=cfg.seed,
                              background_share=cfg.background_share, image_height=model.config.resize_height)
    if not earlier_run and (not args.init or not args.keep_head):  # a new head: start it near 0 (engine/head_init.py)
        if args.init:
            fresh_head(model)
        start_density_head(model, dataset)
    if cfg.prompts_per_image > 1:
        dataset = with_negative_prompts(dataset, base, model, cfg)
    result = train(model, dataset, cfg, args.out, resume=args.resume, device=args.device,
                   progress=not args.no_progress)
    ctx = current_context()
    shutdown(ctx)  # leave the process group torchrun's environment made train() join
    if ctx.is_main:
        state = "finished" if result.finished else "stopped"
        print(f"{state} at step {result.step} (epoch {result.epoch}) in {result.seconds:.0f} s; "
              f"model: {result.final_checkpoint}")
        print(f"evaluate it: {eval_hint(args, result.final_checkpoint)}")
    return 0


def eval_hint(args: argparse.Namespace, checkpoint) -> str:
    """The `clipcount eval` command for the trained model on the same data's test split, ready to paste."""
    import shlex

    words = ["clipcount", "eval", "--model", str(checkpoint), "--dataset", args.dataset, "--root", args.root]
    if args.annotations:
        words += ["--annotations", args.annotations]
    words += ["--split", "test"]
    return " ".join(shlex.quote(str(word)) for word in words)


def _finetune_defaults() -> dict[str, Any]:
    from clipcount.config import FINETUNE_DEFAULTS

    return dict(FINETUNE_DEFAULTS)


def _finetune_defaults_text() -> str:
    """FINETUNE_DEFAULTS as flags, for --help (config.py is light to import)."""
    return ", ".join(f"--{key.replace('_', '-')} {value}" if key in _OVERRIDES else f"{key} {value}"
                     for key, value in _finetune_defaults().items())


def keep_visual_prompts(model) -> None:
    """Fine-tuning: the visual prompts stay as trained (config.FINETUNE_DEFAULTS says why)."""
    for parameter in model.visual_prompts.parameters():
        parameter.requires_grad_(False)


def fresh_head(model) -> None:
    """Fine-tuning: the density output becomes linear (its last convolution is then re-initialised by
    start_density_head). Saturating outputs (softplus, sigmoid) reach 0 on background only through a
    vanishing gradient; config.FINETUNE_DEFAULTS says what that costs. The compat model keeps its
    sigmoid (compat reproduces the published model exactly)."""
    if model.config.compat:
        return
    model.config.decoder.activation = "identity"
    model.decoder.activation = "identity"

def with_negative_prompts(dataset, base, model, cfg):
    """Several prompts per image: the image's own class and absent ones (data/negatives.py), the hard
    ones the names nearest by this model's text encoder."""
    from clipcount.data.negatives import WithNegativePrompts, nearest_class_names

    names = list(getattr(base, "prompts", None) or [base[i].prompt for i in range(len(base))])
    nearest = nearest_class_names(model, names) if cfg.hard_negative_share > 0 else {}
    return WithNegativePrompts(dataset, names, cfg.prompts_per_image, cfg.negative_share,
                               cfg.hard_negative_share, nearest, seed=cfg.seed)


def make_model(args: argparse.Namespace, model_section: dict[str, Any]):
    """The model to train: resumed run's config, --init checkpoint, or a new one (--tiny / config / --clip)."""
    from clipcount.config import ClipCountConfig, tiny_config
    from clipcount.engine.run_folder import LAST, find_checkpoint
    from clipcount.errors import ConfigError
    from clipcount.modeling.build import build_model
    from clipcount.modeling.checkpoint import load_model, read_config
    from clipcount.modeling.clip_count import ClipCount

    resumed = find_checkpoint(Path(args.out), LAST) if args.resume else None
    if resumed is not None:  # weights come from the checkpoint when training resumes
        config, _ = read_config(resumed)
        return ClipCount(config)
    if args.init:
        from clipcount.models import resolve_model

        return load_model(resolve_model(args.init))
    base = (tiny_config() if args.tiny else ClipCountConfig()).to_dict()
    if args.text_similarity:
        model_section = {**model_section, "text_similarity": True}
    if args.image_height is not None:
        model_section = {**model_section, "image_height": args.image_height}
    try:
        config = ClipCountConfig.from_dict(_merged(base, model_section))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model settings in {args.config}: {error}") from None
    if args.tiny:
        return build_model(config)
    if config.compat:
        raise ConfigError("compat mode reproduces the published model's bugs and is for its converted checkpoint "
                          "only; train with compat off")
    if args.clip is None:
        raise ConfigError("a new model needs pretrained CLIP weights: pass --clip (e.g. openai/clip-vit-base-patch16), "
                          "or --init CKPT to start from a clipcount checkpoint, or --tiny for a smoke test")
    return build_model(config, clip_weights=args.clip, clip_activation=args.clip_activation,
                       say=lambda message: print(f"clipcount: {message}", file=sys.stderr))


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` written over it, nested sections merged key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model section, train section) of a YAML or JSON config file."""
    from clipcount.errors import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} not found")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - yaml and json raise different types
        raise ConfigError(f"config file {file} is not valid YAML/JSON ({error})") from None
    data = data or {}
    if not isinstance(data, dict) or set(data) - {"model", "train"}:
        raise ConfigError(f"config file {file} must be a mapping with `model:` and/or `train:` sections, "
                          f"got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    for key in ("model", "train"):
        if not isinstance(data.get(key) or {}, dict):
            raise ConfigError(f"config file {file}: `{key}:` must be a mapping of settings")
    return data.get("model") or {}, data.get("train") or {}


def make_train_config(section: dict[str, Any], args: argparse.Namespace | None = None):
    """TrainConfig from a config file section with command-line flags on top; unknown keys are errors."""
    from clipcount.config import TrainConfig
    from clipcount.errors import ConfigError

    values = dict(section)
    if args is not None:
        for flag, key in _OVERRIDES.items():
            value = getattr(args, flag, None)
            if value is not None:
                values[key] = value
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown training settings {unknown}; known: {sorted(names)}")
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return TrainConfig(**values)
