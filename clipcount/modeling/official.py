"""Converting the published CLIP-Count checkpoint (a PyTorch Lightning `.ckpt`) to clipcount's format.

The file is read with `weights_only=True` and an allow-list of the few harmless classes Lightning
pickles beside the weights (hyper-parameter containers); any other object is refused, not run.
Every source tensor lands in the model (CLIP duplicates are checked to be identical) and every model
parameter is filled; the result has the `compat` switch on.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from clipcount.config import ClipCountConfig, DecoderConfig, InteractionConfig, PromptConfig
from clipcount.errors import CheckpointError
from clipcount.modeling.checkpoint import save_model
from clipcount.modeling.clip_count import ClipCount
from clipcount.modeling.weights import infer_clip_config, load_state_strict

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
_RELEASED_HEADS = 4  # not recoverable from shapes; the released setting


class _HyperParameters(dict):
    """Stands in for Lightning's AttributeDict when reading `hyper_parameters`."""


_ALLOWED_GLOBALS = [argparse.Namespace] + [
    (_HyperParameters, path)
    for path in (
        "pytorch_lightning.utilities.parsing.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "lightning.fabric.utilities.data.AttributeDict",
    )
]


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"published checkpoint {path} does not exist; check the path")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a CLIP-Count checkpoint clipcount can read safely: {first}"
        ) from None
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("model.fim_blocks.") for k in state):
        raise CheckpointError(f"{path} has no CLIP-Count 'state_dict' (expected keys like model.fim_blocks.0.*)")
    return state


def rename_official(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Published keys -> clipcount keys; shared CLIP copies must agree, unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = next((new + key[len(old) :] for old, new in _RENAMES if key.startswith(old)), None)
        if new is None:
            raise CheckpointError(f"{source}: unknown key {key!r} in the published checkpoint")
        value = value.float()  # the released CLIP tensors are probably float16
        if new in out and not torch.equal(out[new], value):
            raise CheckpointError(f"{source}: {key!r} differs from its shared copy {new!r}; the file is inconsistent")
        out[new] = value
    return out


def official_config(state: dict[str, torch.Tensor]) -> ClipCountConfig:
    clip_state = {k[len("clip.") :]: v for k, v in state.items() if k.startswith("clip.")}
    prompts = state["visual_prompts.visual_prompt"].shape
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"interaction\.fim_blocks\.(\d+)\.", k))}
    width = state["patch_feat_proj.weight"].shape[0]
    channels = tuple(state[f"decoder.convs.{i}.0.weight"].shape[0] for i in range(4))
    return ClipCountConfig(
        clip=infer_clip_config(clip_state),
        prompts=PromptConfig(
            visual_tokens=prompts[1],
            visual_layers=prompts[0],
            text_context_tokens=state["text_context.learnable_context"].shape[0],
        ),
        interaction=InteractionConfig(scales=len(blocks), width=width, heads=_RELEASED_HEADS),
        decoder=DecoderConfig(channels=channels, groups=8, activation="sigmoid"),
        compat=True,
    )


def convert_official(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Read the published `.ckpt`, build the compat model, fill it strictly and save it to `out`."""
    state = rename_official(read_official_checkpoint(ckpt), str(ckpt))
    model = ClipCount(official_config(state))
    load_state_strict(model, state, str(ckpt))
    return save_model(model, out, extra={"source": "CLIP-Count published checkpoint", "converted_from": Path(ckpt).name})
