"""Real CLIP weights load into clipcount's CLIP and give the same embeddings as the reference library.

A tiny random `transformers.CLIPModel` is the reference; the OpenAI and OpenCLIP files are made by
renaming its weights the way those libraries lay them out (written out here, independently of
clipcount's own renaming code).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipcount.errors import CheckpointError
from clipcount.modeling.tokenizer import ClipTokenizer
from clipcount.modeling.weights import load_clip

transformers = pytest.importorskip("transformers")

PROMPTS = ["car", "apples", "green pea", "hot air balloon", ""]


def tiny_hf_clip(activation: str = "quick_gelu"):
    common = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act=activation)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, max_position_embeddings=77, **common),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, **common),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # random LayerNorm/bias values so that no weight can hide behind a default
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "layrnorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def reference_embeddings(model, images, ids):
    with torch.no_grad():
        return _features(model.get_image_features(pixel_values=images)), _features(model.get_text_features(input_ids=ids))


def openai_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """How OpenAI's `clip` package names the same tensors."""
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out = {
        "visual.class_embedding": hf_state["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": hf_state["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": hf_state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf_state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf_state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf_state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf_state["vision_model.post_layernorm.bias"],
        "visual.proj": hf_state["visual_projection.weight"].t(),
        "token_embedding.weight": hf_state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf_state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf_state["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf_state["text_model.final_layer_norm.bias"],
        "text_projection": hf_state["text_projection.weight"].t(),
        "logit_scale": hf_state["logit_scale"],
    }
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(2):
            src = f"{tower}.encoder.layers.{i}."
            dst = f"{prefix}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                    [hf_state[src + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]
                )
                for hf_name, oa_name in block.items():
                    out[dst + f"{oa_name}.{kind}"] = hf_state[src + f"{hf_name}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32), ClipTokenizer()(PROMPTS)


def assert_same_embeddings(ours, reference, images, ids):
    want_image, want_text = reference
    with torch.no_grad():
        assert (ours.encode_image(images) - want_image).abs().max() <= 1e-5
        assert (ours.encode_text(ids) - want_text).abs().max() <= 1e-5


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_huggingface_folder(tmp_path, inputs, activation):
    model = tiny_hf_clip(activation)
    model.save_pretrained(tmp_path)  # safetensors + config.json
    ours = load_clip(tmp_path)
    assert ours.cfg.activation == activation
    assert_same_embeddings(ours, reference_embeddings(model, *inputs), *inputs)


def test_huggingface_bin_folder(tmp_path, inputs):
    model = tiny_hf_clip()
    model.save_pretrained(tmp_path)
    state = transformers.CLIPModel.from_pretrained(tmp_path).state_dict()
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_embeddings(load_clip(tmp_path), reference_embeddings(model, *inputs), *inputs)


def test_openai_state_dict(tmp_path, inputs):
    model = tiny_hf_clip()
    state = openai_layout(model.state_dict())
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "ViT-tiny.pt")
    from clipcount.config import CLIPConfig, TextConfig, VisionConfig

    # heads cannot be read from shapes below width 64; released CLIPs all use width / 64
    config = CLIPConfig(VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0),
                        TextConfig(width=32, layers=2, heads=2, mlp_ratio=2.0), embed_dim=16)
    ours = load_clip(tmp_path / "ViT-tiny.pt", config=config)
    assert_same_embeddings(ours, reference_embeddings(model, *inputs), *inputs)


class _Holder(nn.Module):
    """A module tree whose state dict has given dotted names (to write a TorchScript archive)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_openai_torchscript_archive(tmp_path, inputs):
    model = tiny_hf_clip()
    scripted = torch.jit.script(_Holder(openai_layout(model.state_dict())))
    torch.jit.save(scripted, str(tmp_path / "ViT-tiny-jit.pt"))
    from clipcount.config import CLIPConfig, TextConfig, VisionConfig

    config = CLIPConfig(VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0),
                        TextConfig(width=32, layers=2, heads=2, mlp_ratio=2.0), embed_dim=16)
    ours = load_clip(tmp_path / "ViT-tiny-jit.pt", config=config)
    assert_same_embeddings(ours, reference_embeddings(model, *inputs), *inputs)


def test_openclip_state_dict(tmp_path, inputs):
    """OpenCLIP keeps OpenAI's names; its training checkpoints wrap them in state_dict with 'module.'."""
    model = tiny_hf_clip("gelu")
    state = {"module." + k: v for k, v in openai_layout(model.state_dict()).items()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "epoch_3.pt")
    from clipcount.config import CLIPConfig, TextConfig, VisionConfig

    config = CLIPConfig(VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0),
                        TextConfig(width=32, layers=2, heads=2, mlp_ratio=2.0), embed_dim=16, activation="gelu")
    ours = load_clip(tmp_path / "epoch_3.pt", config=config)
    assert_same_embeddings(ours, reference_embeddings(model, *inputs), *inputs)


def test_openclip_custom_text_layout(tmp_path, inputs):
    """CustomTextCLIP nests the text tower under `text.` and may keep a Linear text projection."""
    model = tiny_hf_clip("gelu")
    state = openai_layout(model.state_dict())
    nested = {}
    for key, value in state.items():
        if key.startswith("visual.") or key == "logit_scale":
            nested[key] = value
        elif key == "text_projection":
            nested["text.text_projection.weight"] = value.t()
        else:
            nested["text." + key] = value
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in nested.items()}, str(tmp_path / "open_clip_model.safetensors"))
    from clipcount.config import CLIPConfig, TextConfig, VisionConfig

    config = CLIPConfig(VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0),
                        TextConfig(width=32, layers=2, heads=2, mlp_ratio=2.0), embed_dim=16)
    ours = load_clip(tmp_path / "open_clip_model.safetensors", config=config, activation="gelu")
    assert ours.cfg.activation == "gelu"
    assert_same_embeddings(ours, reference_embeddings(model, *inputs), *inputs)


def test_inferred_architecture_for_released_sizes():
    from clipcount.config import clip_config
    from clipcount.modeling.clip import CLIP
    from clipcount.modeling.weights import infer_clip_config

    for name in ("ViT-B/16", "ViT-B/32"):
        want = clip_config(name)
        with torch.device("meta"):
            state = CLIP(want).state_dict()
        got = infer_clip_config(state)
        assert got == want, name


def test_errors_name_the_problem(tmp_path):
    model = tiny_hf_clip()
    state = openai_layout(model.state_dict())
    broken = dict(state)
    del broken["ln_final.weight"]
    torch.save(broken, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="ln_final"):
        load_clip(tmp_path / "missing.pt")
    extra = dict(state, **{"visual.surprise": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="surprise"):
        load_clip(tmp_path / "extra.pt")
    from clipcount.config import CLIPConfig, TextConfig, VisionConfig

    wrong = CLIPConfig(VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0),
                       TextConfig(width=32, layers=2, heads=2, mlp_ratio=4.0), embed_dim=16)
    torch.save(state, tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match="c_fc.weight.*shape"):
        load_clip(tmp_path / "ok.pt", config=wrong)
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_clip(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="not found"):
        load_clip(tmp_path / "nowhere.pt")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="empty_folder"):
        load_clip(tmp_path / "empty_folder")


def test_hub_ids_go_through_huggingface_hub(tmp_path, inputs, monkeypatch):
    model = tiny_hf_clip()
    model.save_pretrained(tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ours = load_clip("openai/clip-vit-base-patch16")
    assert calls and {repo for repo, _ in calls} == {"openai/clip-vit-base-patch16"}
    assert calls[0][1] == ["*.json"]  # configs first: they say which weights file to fetch
    assert "model.safetensors" in calls[1][1] and len(calls) == 2  # one weights file, safetensors first
    assert_same_embeddings(ours, reference_embeddings(model, *inputs), *inputs)


def test_pickled_code_in_a_weights_file_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"visual.conv1.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="safely"):
        load_clip(tmp_path / "evil.pt")


def test_huggingface_folder_without_config_is_refused(tmp_path):
    """Its activation would be a guess: refused, naming config.json and the way out."""
    tiny_hf_clip("gelu").save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json.*--clip-activation"):
        load_clip(tmp_path)
