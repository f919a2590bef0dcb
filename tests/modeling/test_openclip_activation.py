"""OpenCLIP's plain ViT-B-16 uses GELU, OpenAI's CLIP (and OpenCLIP's ViT-B-16-quickgelu) QuickGELU; their
state dicts look the same. Checked against `open_clip` itself (its own model configs, shrunk, random
weights): a hub folder's open_clip_config.json is read, a bare file is QuickGELU unless told otherwise,
and saying so is what makes the embeddings match.

open_clip imports torchvision at import time, for image transforms these tests never use; where
torchvision is not installed a stand-in module is put in its place while open_clip is imported.
Skipped without open_clip (`pip install --no-deps open_clip_torch ftfy`: its torchvision dependency
would pull another torch).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch

from clipcount.errors import CheckpointError
from clipcount.modeling.tokenizer import ClipTokenizer
from clipcount.modeling.weights import load_clip, read_clip

PROMPTS = ["car", "apples", "green pea", "hot air balloon", ""]
TINY = dict(embed_dim=64, vision_cfg=dict(image_size=64, layers=2, width=128, patch_size=16),
            text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))


class _Anything(type):
    """Any attribute of the stand-in torchvision is a class whose attributes are classes too."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def attribute(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Anything(attr, (), {})

    module.__getattr__ = attribute
    return module


@pytest.fixture(scope="module")
def open_clip():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open_clip_torch ftfy)")
    try:
        import transformers  # noqa: F401 - imported first: it probes for torchvision by its spec
    except ImportError:
        pass
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
             "torchvision.transforms.functional", "torchvision.transforms.v2")
    stubbed = []
    if importlib.util.find_spec("torchvision") is None:
        for name in names:
            if name not in sys.modules:
                sys.modules[name] = _stand_in(name)
                stubbed.append(name)
    try:
        import open_clip
    except ImportError as error:
        pytest.skip(f"open_clip does not import here ({error})")
    finally:
        for name in stubbed:  # open_clip keeps its references; nothing else should see the stand-in
            sys.modules.pop(name, None)
    return open_clip


def make_model(open_clip, name: str):
    """open_clip's own `name` config, shrunk, random weights (LayerNorms and biases too)."""
    config = {**open_clip.get_model_config(name), **TINY}
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, **TINY).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("bias") or "ln" in key:
                param.add_(0.1 * torch.randn_like(param))
    return model, config


def write_hub_folder(open_clip, model, config, folder):
    """What open_clip's `save_for_hf` writes: the weights and its own open_clip_config.json."""
    from safetensors.torch import save_file

    from open_clip.push_to_hf_hub import save_config_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=config)
    return folder


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64), ClipTokenizer()(PROMPTS)


def gap(ours, theirs, images, ids) -> float:
    with torch.no_grad():
        return max(float((ours.encode_image(images) - theirs.encode_image(images)).abs().max()),
                   float((ours.encode_text(ids) - theirs.encode_text(ids)).abs().max()))


@pytest.mark.parametrize("name, activation", [("ViT-B-16", "gelu"), ("ViT-B-16-quickgelu", "quick_gelu")])
def test_hub_folder_says_its_activation(open_clip, tmp_path, inputs, name, activation):
    model, config = make_model(open_clip, name)
    folder = write_hub_folder(open_clip, model, config, tmp_path / name)
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"].get("quick_gelu", False) == (
        activation == "quick_gelu")
    weights = read_clip(folder)
    assert weights.config.activation == activation and "open_clip_config.json" in weights.activation_source
    assert gap(load_clip(folder), model, *inputs) <= 1e-5


def test_bare_file_needs_to_be_told_gelu(open_clip, tmp_path, inputs):
    model, config = make_model(open_clip, "ViT-B-16")
    folder = write_hub_folder(open_clip, model, config, tmp_path / "hub")
    bare = tmp_path / "laion-vit-b-16.safetensors"
    bare.write_bytes((folder / "open_clip_model.safetensors").read_bytes())
    assumed = read_clip(bare)
    assert assumed.config.activation == "quick_gelu" and "assumed" in assumed.activation_source
    assert "--clip-activation" in assumed.describe(bare)
    assert gap(load_clip(bare), model, *inputs) > 1e-3  # silently off: what --clip-activation is for
    assert read_clip(bare, activation="gelu").activation_source == "as given"
    assert gap(load_clip(bare, activation="gelu"), model, *inputs) <= 1e-5


def test_activation_contradicting_the_folder_is_refused(open_clip, tmp_path):
    model, config = make_model(open_clip, "ViT-B-16")
    folder = write_hub_folder(open_clip, model, config, tmp_path / "hub")
    with pytest.raises(CheckpointError, match="says activation gelu"):
        read_clip(folder, activation="quick_gelu")


def test_training_says_which_activation_it_assumed(open_clip, tmp_path):
    from clipcount.config import tiny_config
    from clipcount.modeling.build import build_model

    model, config = make_model(open_clip, "ViT-B-16-quickgelu")
    folder = write_hub_folder(open_clip, model, config, tmp_path / "hub")
    notes = []
    built = build_model(tiny_config(), clip_weights=folder / "open_clip_model.safetensors", clip_activation="gelu",
                        say=notes.append)
    assert built.config.clip.activation == "gelu"
    assert notes == [f"CLIP {folder / 'open_clip_model.safetensors'}: activation gelu (as given)"]
