"""Loading real CLIP weights: OpenAI `.pt` files, Hugging Face `CLIPModel` folders or hub ids, and
OpenCLIP state dicts. Everything is renamed into OpenAI's layout (the one `clip.py` uses) and loaded
with strict key and shape checks; nothing is ever unpickled beyond plain tensors.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from clipcount.config import CLIPConfig, TextConfig, VisionConfig
from clipcount.errors import CheckpointError
from clipcount.modeling.clip import CLIP

StateDict = dict[str, torch.Tensor]

# OpenAI's archives carry these scalars beside the weights; they are not parameters.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


# ---- reading files ------------------------------------------------------------------------------

def read_tensor_file(path: str | os.PathLike) -> StateDict | dict:
    """Read a .safetensors, a plain torch pickle (weights only) or a TorchScript archive."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        # OpenAI's released .pt files are TorchScript archives: read their tensors, run none of their code
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointError(
            f"{path} is not a weights file clipcount can read safely ({type(error).__name__}: "
            f"{str(error).splitlines()[0]}); expected .safetensors, a PyTorch state dict or an OpenAI CLIP .pt"
        ) from None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def unwrap_state_dict(obj: Mapping, path: str | os.PathLike = "<memory>") -> StateDict:
    """Find the tensor dict in common wrappers ({'state_dict': ...}, {'model': ...}, DDP 'module.')."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


# ---- layouts ------------------------------------------------------------------------------------

def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    if any(k.startswith(("vision_model.", "text_model.")) for k in state):
        return "huggingface"
    if any(k.startswith("text.") for k in state):
        return "openclip"
    if "visual.conv1.weight" in state:
        return "openai"
    raise CheckpointError("these weights are not a CLIP model in the OpenAI, OpenCLIP or Hugging Face layout")


def openclip_to_openai(state: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenCLIP keeps OpenAI's names; CustomTextCLIP models nest the text tower under `text.`."""
    out = {}
    for key, value in state.items():
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # a buffer OpenCLIP sometimes saves; clip.py uses causal attention instead
        if key == "text.text_projection.weight":  # a Linear in CustomTextCLIP: store as a matrix
            out["text_projection"] = value.t()
            continue
        out[key[len("text.") :] if key.startswith("text.") else key] = value
    return out


_HF_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_TOP = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
_HF_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")


def huggingface_to_openai(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename `transformers.CLIPModel` weights into OpenAI's layout (q/k/v packed, projections transposed)."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # an index buffer, not a weight
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if key.startswith("visual") else "text_projection"] = value.t()
        elif match := _HF_LAYER.match(key):
            tower, index, rest = match.groups()
            prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{index}."
            if part := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest):
                qkv.setdefault(prefix + "attn.in_proj_" + part.group(2), {})[part.group(1)] = value
            else:
                module, _, leaf = rest.rpartition(".")
                if module not in _HF_BLOCK:
                    raise CheckpointError(f"unexpected Hugging Face CLIP key {key!r}")
                out[prefix + _HF_BLOCK[module] + "." + leaf] = value
        else:
            raise CheckpointError(f"unexpected Hugging Face CLIP key {key!r}")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_openai_layout(state: Mapping[str, torch.Tensor]) -> StateDict:
    layout = detect_layout(state)
    if layout == "huggingface":
        return huggingface_to_openai(state)
    if layout == "openclip":
        return openclip_to_openai(state)
    return {k: v for k, v in state.items() if k not in _OPENAI_EXTRAS and not k.endswith("attn_mask")}


# ---- configs ------------------------------------------------------------------------------------

def infer_clip_config(state: Mapping[str, torch.Tensor], activation: str = "quick_gelu") -> CLIPConfig:
    """Architecture from tensor shapes (OpenAI layout). Heads are width / 64, as in every released CLIP."""
    try:
        return _infer_clip_config(state, activation)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"cannot read the CLIP architecture from these weights: missing {error}") from None


def _infer_clip_config(state: Mapping[str, torch.Tensor], activation: str) -> CLIPConfig:
    conv = state["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    text_width = state["ln_final.weight"].shape[0]
    vision = VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=vision_width,
        layers=_count_blocks(state, "visual.transformer.resblocks."),
        heads=max(1, vision_width // 64),
        mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vision_width,
    )
    text = TextConfig(
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        width=text_width,
        layers=_count_blocks(state, "transformer.resblocks."),
        heads=max(1, text_width // 64),
        mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    return CLIPConfig(vision, text, embed_dim=state["text_projection"].shape[1], activation=activation)


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))


def clip_config_from_huggingface(config: Mapping) -> CLIPConfig:
    """Read `config.json` of a `transformers.CLIPModel`."""
    v, t = config.get("vision_config", {}), config.get("text_config", {})
    activation = v.get("hidden_act", "quick_gelu")
    if activation not in ("quick_gelu", "gelu") or t.get("hidden_act", activation) != activation:
        raise CheckpointError(f"unsupported CLIP activation {activation!r} (expected quick_gelu or gelu)")
    vision = VisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 32),
        width=v.get("hidden_size", 768),
        layers=v.get("num_hidden_layers", 12),
        heads=v.get("num_attention_heads", 12),
        mlp_ratio=v.get("intermediate_size", 3072) / v.get("hidden_size", 768),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5),
    )
    text = TextConfig(
        context_length=t.get("max_position_embeddings", 77),
        vocab_size=t.get("vocab_size", 49408),
        width=t.get("hidden_size", 512),
        layers=t.get("num_hidden_layers", 12),
        heads=t.get("num_attention_heads", 8),
        mlp_ratio=t.get("intermediate_size", 2048) / t.get("hidden_size", 512),
        layer_norm_eps=t.get("layer_norm_eps", 1e-5),
    )
    return CLIPConfig(vision, text, embed_dim=config.get("projection_dim", 512), activation=activation)


# ---- loading ------------------------------------------------------------------------------------

def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      assign: bool = False) -> None:
    """Copy `state` into `module`; any missing, unexpected or mis-shaped key is an error naming it."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s), first {missing[:3]}; is it the right model?")
    if unexpected:
        raise CheckpointError(f"{source} has {len(unexpected)} unknown weight(s), first {unexpected[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"{source}: weight {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    # assign=True adopts the tensors themselves (for modules built on the meta device)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True, assign=assign)


# Weight files of the two hub layouts, in order of preference (safetensors: nothing unpickled).
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_CONFIG = "config.json"
_OPENCLIP_CONFIG = "open_clip_config.json"
ACTIVATIONS = ("quick_gelu", "gelu")
_ACTIVATION_HINT = ("OpenAI's CLIP uses quick_gelu, OpenCLIP's own models (e.g. LAION's ViT-B-16) gelu; "
                    "say which with --clip-activation")


def resolve_clip_source(source: str | os.PathLike) -> Path:
    """A local file or folder, or a Hugging Face hub id downloaded (configs and one weights file)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        return _download_clip(str(source))
    raise CheckpointError(f"CLIP weights {source!r} not found: give a file, a folder or a hub id like openai/clip-vit-base-patch16")


def _download_clip(repo_id: str) -> Path:
    """The repo's JSON files and then only the weights its layout needs (LAION's repos hold both the
    Hugging Face and the OpenCLIP copy: 2 x 600 MB for ViT-B-16)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["*.json"]))
        names = _HF_WEIGHTS if (folder / _HF_CONFIG).is_file() else _OPENCLIP_WEIGHTS
        for name in names:  # safetensors first; the pickle only where a repo has nothing else
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", name]))
            if (folder / name).is_file():
                break
        return folder
    except Exception as error:  # noqa: BLE001 - network and hub errors vary by version
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(error).__name__}); "
            "check the id and your network, or pass a local folder or file"
        ) from None


@dataclass
class ClipWeights:
    """CLIP weights in OpenAI's layout, their architecture, and where the activation was read."""

    state: StateDict
    config: CLIPConfig
    activation_source: str  # e.g. "config.json hidden_act", "assumed for a bare weights file"

    def describe(self, source: str | os.PathLike) -> str:
        return f"CLIP {source}: activation {self.config.activation} ({self.activation_source})"


def read_clip(source: str | os.PathLike, config: CLIPConfig | None = None, activation: str | None = None) -> ClipWeights:
    """Weights (OpenAI layout), architecture and activation from any supported source.

    The MLP activation cannot be read from weights (OpenAI's QuickGELU and OpenCLIP's GELU models
    have identical state dicts): a Hugging Face folder says it in config.json (`hidden_act`), an
    OpenCLIP hub folder in open_clip_config.json (`quick_gelu`); for a bare file it is `activation`,
    else QuickGELU is assumed and `activation_source` says so. A given `activation` that contradicts
    the folder's own config is an error, not an override.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise CheckpointError(f"unknown CLIP activation {activation!r}; use quick_gelu or gelu")
    path = resolve_clip_source(source)
    layout, folder_config = None, None
    if path.is_dir():
        path, layout, folder_config = _clip_folder(path)
    state = to_openai_layout(unwrap_state_dict(read_tensor_file(path), path))
    if layout == "huggingface":
        read = clip_config_from_huggingface(folder_config)
        found, where = read.activation, f"{_HF_CONFIG} hidden_act"
    elif layout == "openclip":
        read = clip_config_from_openclip(folder_config, state, path.parent)
        found, where = read.activation, f"{_OPENCLIP_CONFIG} quick_gelu"
    elif activation is not None:
        read, found, where = None, activation, "as given"
    elif config is not None:
        read, found, where = None, config.activation, "from the given config"
    else:
        read, found = None, "quick_gelu"
        where = f"assumed: a weights file does not say; {_ACTIVATION_HINT}"
    if read is not None and activation is not None and activation != found:
        raise CheckpointError(f"{path.parent} says activation {found} ({where}), not {activation}; "
                              "drop --clip-activation or fix the folder")
    config = config or read or infer_clip_config(state, activation=found)
    config.activation = found
    return ClipWeights(state, config, where)


def read_clip_weights(
    source: str | os.PathLike, config: CLIPConfig | None = None, activation: str | None = None
) -> tuple[StateDict, CLIPConfig]:
    """(weights, architecture) of `read_clip`."""
    weights = read_clip(source, config, activation)
    return weights.state, weights.config


def _clip_folder(folder: Path) -> tuple[Path, str, dict]:
    """(weights file, layout, its config) of a Hugging Face `CLIPModel` or OpenCLIP hub folder."""
    hf = next((folder / n for n in _HF_WEIGHTS if (folder / n).is_file()), None)
    openclip = next((folder / n for n in _OPENCLIP_WEIGHTS if (folder / n).is_file()), None)
    if hf is not None and (folder / _HF_CONFIG).is_file():
        return hf, "huggingface", _read_json(folder / _HF_CONFIG)
    if openclip is not None and (folder / _OPENCLIP_CONFIG).is_file():
        return openclip, "openclip", _read_json(folder / _OPENCLIP_CONFIG)
    if hf is not None:
        raise CheckpointError(
            f"{folder} has {hf.name} but no {_HF_CONFIG}, so its activation (quick_gelu or gelu) is unknown; "
            f"copy config.json from the model's hub page into it, or pass {hf} itself with --clip-activation"
        )
    if openclip is not None:
        raise CheckpointError(f"{folder} has {openclip.name} but no {_OPENCLIP_CONFIG}; copy it from the model's "
                              f"hub page, or pass {openclip} itself with --clip-activation")
    raise CheckpointError(f"{folder} has no model.safetensors or pytorch_model.bin (Hugging Face) nor "
                          "open_clip_model.safetensors (OpenCLIP); is it a CLIP model folder?")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a config object")
    return data


# OpenCLIP model settings whose towers clip.py does not build (their weights would not load anyway,
# except for these, which change the computation without changing the weights).
_OPENCLIP_UNSUPPORTED = {
    ("vision_cfg", "timm_model_name"): None, ("text_cfg", "hf_model_name"): None,
    ("vision_cfg", "attentional_pool"): False, ("vision_cfg", "final_ln_after_pool"): False,
    ("text_cfg", "final_ln_after_pool"): False, ("text_cfg", "no_causal_mask"): False,
    ("text_cfg", "pool_type"): "argmax", ("vision_cfg", "pool_type"): "tok", ("vision_cfg", "no_ln_pre"): False,
    ("text_cfg", "embed_cls"): False, ("vision_cfg", "input_patchnorm"): False,
}


def clip_config_from_openclip(config: Mapping, state: Mapping[str, torch.Tensor], folder: Path) -> CLIPConfig:
    """Architecture of an OpenCLIP hub folder: shapes from the weights, heads and activation from
    `open_clip_config.json` (`model_cfg`; `quick_gelu` true = QuickGELU, absent or false = GELU)."""
    model_cfg = config.get("model_cfg", config)
    for (tower, key), default in _OPENCLIP_UNSUPPORTED.items():
        value = model_cfg.get(tower, {}).get(key, default)
        if value != default:
            raise CheckpointError(f"{folder}: OpenCLIP setting {tower}.{key}={value!r} is not supported by "
                                  "clipcount's CLIP (plain ViT image and text towers only)")
    activation = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    inferred = infer_clip_config(state, activation=activation)
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    inferred.vision.heads = max(1, inferred.vision.width // int(vision_cfg.get("head_width", 64)))
    inferred.text.heads = int(text_cfg.get("heads", inferred.text.heads))
    return inferred


def load_clip(source: str | os.PathLike, config: CLIPConfig | None = None, activation: str | None = None) -> CLIP:
    """Build a CLIP and fill it from `source` (file, folder or hub id)."""
    state, config = read_clip_weights(source, config, activation)
    model = CLIP(config)
    load_state_strict(model, state, str(source))
    return model.eval()
