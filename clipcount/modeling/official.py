"""Converting the published CLIP-Count checkpoint (a PyTorch Lightning `.ckpt`) to clipcount's format.

What a published file holds, and how each part is used:
- `state_dict`: the trainable tensors, prefixed `model.`. The published `run.py` deletes the frozen
  CLIP tensors when it saves (unless CLIP was fine-tuned), so the released file has about 85 keys
  and its own loading takes CLIP from OpenAI's release. A file that still has them (up to three
  copies under different prefixes, checked to be identical) is accepted too. Without them the CLIP
  weights come from `clip_source` (any layout `weights.read_clip` loads), by default OpenAI's
  release for the checkpoint's backbone on the Hugging Face hub.
- `hyper_parameters`: the `run.py` arguments (an `argparse.Namespace`, a dict or Lightning's
  `AttributeDict`). The architecture is read from them, since the attention heads cannot be seen in
  any tensor shape; settings compat cannot reproduce are refused. Without them `run.py`'s defaults
  apply, and the converter says so.

The file is read with `weights_only=True` and an allow-list of the few harmless classes Lightning
pickles beside the weights; any other object is refused, never run. Every source tensor lands in
the model and every model parameter is filled; the result has the `compat` switch on and the
published evaluation windowing as its default.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from clipcount.config import CLIPConfig, ClipCountConfig, DecoderConfig, InteractionConfig, PromptConfig, clip_config
from clipcount.errors import CheckpointError
from clipcount.modeling.checkpoint import save_model
from clipcount.modeling.clip_count import ClipCount
from clipcount.modeling.weights import infer_clip_config, load_state_strict, read_clip

Say = Callable[[str], None]

# published name prefix -> clipcount name prefix (first match wins)
_RENAMES = [
    ("model.img_encoder.vit.", "clip.visual."),
    ("model.text_encoder.clip_model.", "clip."),
    ("model.clip.", "clip."),
    ("model.img_encoder.visual_prompt", "visual_prompts.visual_prompt"),
    ("model.img_encoder.vpt_norm.", "visual_prompts.vpt_norm."),
    ("model.img_encoder.vpt_proj.", "visual_prompts.vpt_proj."),
    ("model.text_encoder.learnable_context", "text_context.learnable_context"),
    ("model.patch_emb_pos_embed", "patch_pos_embed"),
    ("model.patch_feat_proj_contrast.", "patch_feat_proj_contrast."),
    ("model.patch_feat_proj.", "patch_feat_proj."),
    ("model.decoder_ln_pre.", "unused.decoder_ln_pre."),
    ("model.decoder_norm.", "unused.decoder_norm."),
    ("model.fim_blocks.", "interaction.fim_blocks."),
    ("model.density_decoder.pyradim_conv.", "decoder.laterals.0."),
    ("model.density_decoder.", "decoder."),
]

# run.py's `--backbone` -> (CLIP architecture, OpenAI's release of it on the Hugging Face hub)
BACKBONES = {
    "b16": ("ViT-B/16", "openai/clip-vit-base-patch16"),
    "b32": ("ViT-B/32", "openai/clip-vit-base-patch32"),
    "l14": ("ViT-L/14", "openai/clip-vit-large-patch14"),
}
# OpenAI's own ViT-B/16 file, for people who fetch CLIP by hand
OPENAI_VIT_B16_URL = ("https://openaipublic.azureedge.net/clip/models/"
                      "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt")


@dataclass
class PublishedSettings:
    """The `run.py` arguments that shape the model, with `run.py`'s defaults."""

    backbone: str = "b16"
    decoder_head: int = 8  # attention heads of the interaction blocks
    vpt_width: int = 20  # visual prompt tokens per layer
    vpt_depth: int = 10  # prompted layers
    coop_width: int = 2  # learnable text context tokens
    use_vpt: bool = True
    use_coop: bool = True
    use_mixed_fim: bool = True  # the hierarchical interaction (the paper's model)
    use_fim: bool = False  # a plain transformer interaction instead
    unfreeze_vit: bool = False  # CLIP's image tower fine-tuned (then the file keeps CLIP)


def _numpy_globals() -> list:
    """numpy scalars and dtypes, which Lightning's callback states may hold: data, not code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed it; pickles name either
    scalar = core.multiarray.scalar
    found = [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    return found + [cls for cls in vars(getattr(np, "dtypes", object)).values() if isinstance(cls, type)]


_ATTRIBUTE_DICTS = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
)


def _allowed_globals() -> list:
    # Lightning's AttributeDict is read as an OrderedDict: the weights-only unpickler fills only
    # plain dict types, and its entries are all that matters here.
    return [argparse.Namespace] + [(OrderedDict, path) for path in _ATTRIBUTE_DICTS] + _numpy_globals()


# ---- reading ------------------------------------------------------------------------------------

def load_official_file(path: str | os.PathLike) -> dict:
    """The whole Lightning checkpoint (weights only: refused if it would need any other object)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"published checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(f"{path} is not a CLIP-Count checkpoint clipcount can read safely: "
                              f"{_unreadable_reason(path, error)}") from None
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("model.fim_blocks.") for k in state):
        raise CheckpointError(f"{path} has no CLIP-Count 'state_dict' (expected keys like model.fim_blocks.0.*)")
    return obj


def _unreadable_reason(path: Path, error: Exception) -> str:
    """Why torch.load refused a file, for people: not torch's advice to unpickle it anyway
    (weights_only=False runs code from the file), nor its internal errors ("pop from empty list")."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes); download it again"
    unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
    if unsafe:
        return (f"it holds a pickled {unsafe.group(1)}, which clipcount does not unpickle (no code from "
                "checkpoints is run)")
    return "it is not a PyTorch checkpoint file; give the published .ckpt (clipcount_pretrained.ckpt)"


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Just the `state_dict` of a published checkpoint."""
    return load_official_file(path)["state_dict"]


def hyper_parameters(obj: Mapping) -> dict[str, Any] | None:
    """`hyper_parameters` as a plain dict, from any container Lightning writes; None when absent."""
    raw = obj.get("hyper_parameters")
    if raw is None:
        return None
    found = _as_dict(raw)
    if found is None:
        raise CheckpointError(f"hyper_parameters is a {type(raw).__name__}, not a dict or argparse.Namespace")
    names = {f.name for f in fields(PublishedSettings)}
    nested = [_as_dict(v) for v in found.values()]
    if not names & set(found) and len(nested) == 1 and nested[0] is not None:
        found = nested[0]  # saved under one name, e.g. {"args": Namespace(...)}
    return found


def _as_dict(value: Any) -> dict | None:
    if isinstance(value, argparse.Namespace):
        return dict(vars(value))
    if isinstance(value, Mapping):
        return dict(value)
    return None


def published_settings(hparams: Mapping[str, Any] | None, say: Say | None = None) -> PublishedSettings:
    """The architecture settings, `run.py` defaults for what `hparams` lacks (said through `say`);
    CheckpointError for values compat cannot reproduce or that the published code could not run."""
    say = say or (lambda _: None)
    defaults = PublishedSettings()
    if hparams is None:
        say("the checkpoint has no hyper_parameters: assuming run.py's defaults "
            f"({_describe(defaults)})")
        return defaults
    values, missing = {}, []
    for field in fields(PublishedSettings):
        if field.name in hparams and hparams[field.name] is not None:
            values[field.name] = _typed(field.name, hparams[field.name], getattr(defaults, field.name))
        else:
            missing.append(f"{field.name}={getattr(defaults, field.name)}")
    if missing:
        say(f"hyper_parameters lack {', '.join(missing)}: run.py's default assumed")
    settings = PublishedSettings(**{**vars(defaults), **values})
    check_settings(settings)
    return settings


def _typed(name: str, value: Any, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"):
                    raise ValueError(value)
                return value.strip().lower() in ("true", "yes", "1", "t", "y")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return str(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"hyper_parameters {name}={value!r} is not a valid {type(default).__name__}") from None


def check_settings(s: PublishedSettings) -> None:
    """Refuse what compat does not reproduce (or what the published code itself could not run)."""
    def refuse(reason: str) -> None:
        raise CheckpointError(f"this checkpoint was trained with {reason}; clipcount's compat mode does not "
                              "reproduce that, so it is not converted")

    if s.backbone not in BACKBONES:
        refuse(f"backbone={s.backbone!r} (run.py allows {', '.join(BACKBONES)})")
    if s.backbone == "l14" and s.use_mixed_fim:
        refuse("backbone='l14' and the hierarchical interaction, which the published code cannot run "
               "(its pyradim_conv is fixed at 512 input channels, ViT-L/14's features have 768)")
    if s.use_fim:
        refuse("use_fim=True (a plain transformer interaction, not the paper's hierarchical one)")
    if not s.use_mixed_fim:
        refuse("use_mixed_fim=False (no hierarchical interaction)")
    if not s.use_vpt:
        refuse("use_vpt=False (its image encoder then skips vpt_norm)")
    if s.vpt_depth < 2 or s.vpt_width < 1:
        refuse(f"vpt_depth={s.vpt_depth}, vpt_width={s.vpt_width} (the published code runs deep prompts "
               "only, at least 2 layers of at least 1 token)")
    if s.use_coop and s.coop_width < 1:
        refuse(f"use_coop=True with coop_width={s.coop_width}")
    width = clip_config(BACKBONES[s.backbone][0]).embed_dim
    if s.decoder_head < 1 or width % s.decoder_head:
        refuse(f"decoder_head={s.decoder_head}, which does not divide the interaction width {width}")
    layers = clip_config(BACKBONES[s.backbone][0]).vision.layers
    if s.vpt_depth >= layers:
        refuse(f"vpt_depth={s.vpt_depth}, not below the {layers} layers of {BACKBONES[s.backbone][0]} "
               "(the published code asserts that)")


def _describe(s: PublishedSettings) -> str:
    return ", ".join(f"{f.name}={getattr(s, f.name)}" for f in fields(PublishedSettings))


# ---- renaming and configuration -----------------------------------------------------------------

def rename_official(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Published keys -> clipcount keys; shared CLIP copies must agree, unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = next((new + key[len(old) :] for old, new in _RENAMES if key.startswith(old)), None)
        if new is None:
            raise CheckpointError(f"{source}: unknown key {key!r} in the published checkpoint")
        value = value.float()  # CLIP tensors saved from a CUDA model are float16
        if new in out and not torch.equal(out[new], value):
            raise CheckpointError(f"{source}: {key!r} differs from its shared copy {new!r}; the file is inconsistent")
        out[new] = value
    return out


def official_config(settings: PublishedSettings, clip: CLIPConfig) -> ClipCountConfig:
    """The compat model the settings describe, on `clip`."""
    width = clip.embed_dim  # the published interaction works in CLIP's output width
    return ClipCountConfig(
        clip=clip,
        prompts=PromptConfig(
            visual_tokens=settings.vpt_width,
            visual_layers=settings.vpt_depth,
            text_context_tokens=settings.coop_width if settings.use_coop else 0,
        ),
        interaction=InteractionConfig(scales=2, width=width, heads=settings.decoder_head),
        decoder=DecoderConfig(channels=tuple(width // 2**k for k in range(1, 5)), groups=8, activation="sigmoid"),
        compat=True,
        windowing="published",
    )


def check_clip_fits(clip: CLIPConfig, settings: PublishedSettings, source: str) -> None:
    """CheckpointError naming `source` unless its architecture is the checkpoint's backbone."""
    name = BACKBONES[settings.backbone][0]
    want = clip_config(name)
    checks = [
        ("image size", clip.vision.image_size, want.vision.image_size),
        ("patch size", clip.vision.patch_size, want.vision.patch_size),
        ("image width", clip.vision.width, want.vision.width),
        ("image layers", clip.vision.layers, want.vision.layers),
        ("text width", clip.text.width, want.text.width),
        ("text layers", clip.text.layers, want.text.layers),
        ("embedding width", clip.embed_dim, want.embed_dim),
    ]
    for what, got, expected in checks:
        if got != expected:
            raise CheckpointError(
                f"the CLIP weights from {source} do not fit this checkpoint: {what} {got}, but its backbone "
                f"{settings.backbone} is {name} ({what} {expected}); give {name} weights with --clip, e.g. "
                f"{BACKBONES[settings.backbone][1]}"
            )
    if clip.activation != "quick_gelu":
        raise CheckpointError(
            f"the CLIP weights from {source} use {clip.activation}, but the published model was trained on "
            f"OpenAI's {name} (quick_gelu): they are not the weights it was trained with; give OpenAI's {name}"
        )


# ---- converting ---------------------------------------------------------------------------------

def convert_official(ckpt: str | os.PathLike, out: str | os.PathLike, clip: str | os.PathLike | None = None,
                     clip_activation: str | None = None, say: Say | None = None) -> Path:
    """Read the published `.ckpt`, build the compat model it describes, fill it strictly, save to `out`.

    `clip`: where CLIP's weights come from when the file lacks them (default: OpenAI's release for
    the backbone, from the Hugging Face hub); `say` receives one-line notes (assumptions made).
    """
    model, extra = build_official_model(ckpt, clip, clip_activation, say)
    return save_model(model, out, extra=extra)


def build_official_model(ckpt: str | os.PathLike, clip: str | os.PathLike | None = None,
                         clip_activation: str | None = None, say: Say | None = None) -> tuple[ClipCount, dict]:
    """The compat model of a published `.ckpt` (in memory) and what to record about its origin."""
    say = say or (lambda _: None)
    obj = load_official_file(ckpt)
    settings = published_settings(hyper_parameters(obj), say)
    state = rename_official(obj["state_dict"], str(ckpt))
    if any(k.startswith("clip.") for k in state):
        if clip is not None:
            say(f"{ckpt} holds its own CLIP weights; --clip {clip} is not used")
        clip_cfg = infer_clip_config({k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")})
        clip_source = "the checkpoint itself"
        check_clip_fits(clip_cfg, settings, str(ckpt))
    else:
        if settings.unfreeze_vit:
            raise CheckpointError(f"{ckpt} was trained with CLIP's image tower unfrozen (unfreeze_vit=True) but holds "
                                  "no CLIP weights: the trained ones are lost, so it cannot be converted")
        clip_source = str(clip) if clip is not None else BACKBONES[settings.backbone][1]
        weights = _read_default_clip(clip_source, clip_activation, settings, explicit=clip is not None)
        say(f"{ckpt} holds no CLIP weights (the released file never does): {weights.describe(clip_source)}")
        clip_cfg = weights.config
        check_clip_fits(clip_cfg, settings, clip_source)
        state.update({"clip." + k: v for k, v in weights.state.items()})
    config = official_config(settings, clip_cfg)
    if not settings.use_coop:  # the published text encoder has no context then: an empty one is the same
        state.setdefault("text_context.learnable_context", torch.empty(0, clip_cfg.text.width))
    with torch.device("meta"):  # shapes only: every value comes from the file or the CLIP weights
        model = ClipCount(config)
    try:
        load_state_strict(model, state, str(ckpt), assign=True)
    except CheckpointError as error:
        raise CheckpointError(f"{error} (model built from: {_describe(settings)})") from None
    model.set_constant_buffers("cpu")
    model.freeze_clip()
    extra = {"source": "CLIP-Count published checkpoint", "converted_from": Path(ckpt).name,
             "published_settings": vars(settings), "clip_weights": clip_source}
    return model.eval(), extra


def _read_default_clip(source: str, activation: str | None, settings: PublishedSettings, explicit: bool):
    try:
        return read_clip(source, activation=activation)
    except CheckpointError as error:
        if explicit:
            raise
        name, hub_id = BACKBONES[settings.backbone]
        where = f"huggingface.co/{hub_id}" + (f" or OpenAI's {OPENAI_VIT_B16_URL}" if settings.backbone == "b16" else "")
        raise CheckpointError(
            f"the checkpoint holds no CLIP weights and OpenAI's {name} could not be fetched ({error}); "
            f"download them ({where}) and pass the folder or file with --clip"
        ) from None
