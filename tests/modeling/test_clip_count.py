"""The CLIP-Count assembly: its contract, what trains, what stays frozen, and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipcount.config import ClipCountConfig, InteractionConfig, tiny_config
from clipcount.errors import CheckpointError, PromptError
from clipcount.modeling.checkpoint import load_model, save_model
from clipcount.modeling.clip_count import ClipCount


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ClipCount(tiny_config()).eval()


def images(batch=2, size=64):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def test_contract_density_per_image_and_count(model):
    density = model(images(), ["car", "red circles"])
    assert density.shape == (2, 1, 64, 64)
    assert torch.allclose(model.count(density), (density.sum(dim=(1, 2, 3)) / 60).clamp(min=0))


def test_counts_are_floored_at_zero(model):
    below = torch.full((1, 1, 8, 8), -0.01)
    assert model.count(below).item() == 0.0
    assert model.count(-below).item() > 0


@pytest.mark.parametrize("activation", ["softplus", "sigmoid", "relu"])
def test_bounded_activations_give_non_negative_density(activation):
    cfg = tiny_config()
    cfg.decoder.activation = activation
    torch.manual_seed(0)
    density = ClipCount(cfg).eval()(images(), ["car", "red circles"])
    assert (density >= 0).all()


def test_encoders_are_reusable_for_many_prompts(model):
    x = images(1)
    with torch.no_grad():
        feats = model.encode_image(x)
        text = model.encode_text(["car", "apples", "stars"])
        many = model.density_from_features(feats.expand(3, -1, -1), text, (64, 64))
        for i, prompt in enumerate(["car", "apples", "stars"]):
            assert torch.allclose(many[i], model(x, [prompt])[0], atol=1e-6)


def test_one_token_classes_get_their_own_embedding():
    torch.manual_seed(0)
    fixed = ClipCount(tiny_config()).eval()
    torch.manual_seed(0)
    compat = ClipCount(tiny_config(compat=True)).eval()
    with torch.no_grad():
        ours = fixed.encode_text(["car", "apples", "people"])
        theirs = compat.encode_text(["car", "apples", "people"])
    assert not torch.allclose(ours[0], ours[1])
    assert not torch.allclose(ours[1], ours[2])
    assert torch.equal(theirs[0], theirs[1]) and torch.equal(theirs[1], theirs[2])  # the published bug


def test_clip_is_frozen_and_only_the_counting_parts_train():
    torch.manual_seed(0)
    model = ClipCount(tiny_config()).train()
    x = images()
    feats = model.encode_image(x)
    text = model.encode_text(["car", "balls"])
    density = model.density_from_features(feats, text, (64, 64))
    contrast = (model.contrastive_features(feats) * text).sum()
    (density.mean() + contrast).backward()
    for name, param in model.named_parameters():
        if name.startswith("clip."):
            assert not param.requires_grad and param.grad is None, name
        elif any(part in name for part in (".attn.wq.", ".attn.wk.", ".norm1.")):
            # cross-attention to one text token: its queries, keys and the norm before them only
            # ever get zero gradients, so they are left out of the graph (CrossAttention's shortcut)
            assert param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad and param.grad is not None, name
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"visual_prompts", "text_context", "patch_feat_proj", "patch_feat_proj_contrast",
                         "text_proj", "interaction", "decoder"} - {"text_proj"} | (
        {"text_proj"} if any(n.startswith("text_proj.") for n, _ in model.named_parameters()) else set())
    assert model.num_trainable_parameters() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not model.clip.training  # frozen towers stay in eval mode (no dropout, fixed statistics)


def test_every_visual_prompt_layer_is_used_and_compat_skips_the_last():
    def prompt_grads(compat):
        torch.manual_seed(0)
        model = ClipCount(tiny_config(compat=compat)).train()
        model.visual_prompts.dropout.p = 0.0
        model.encode_image(images(1)).sum().backward()
        return [bool(g.abs().sum() > 0) for g in model.visual_prompts.visual_prompt.grad]

    assert prompt_grads(False) == [True, True]
    assert prompt_grads(True) == [True, False]  # published: prompt 0 used twice, the last never


def test_image_encoder_fine_tuning_switch():
    config = tiny_config()
    config.train_image_encoder = True
    model = ClipCount(config)
    assert all(p.requires_grad for p in model.clip.visual.parameters())
    assert not any(p.requires_grad for p in model.clip.transformer.parameters())


@pytest.mark.parametrize("scales", [1, 2, 3])
def test_interaction_scales(scales):
    config = dataclasses.replace(tiny_config(), interaction=InteractionConfig(scales=scales, width=16, heads=2))
    model = ClipCount(config).eval()
    with torch.no_grad():
        maps = model.interaction_maps(model.encode_image(images(1)), model.encode_text(["car"]))
    assert [m.shape[-1] for m in maps] == [4 * 2**k for k in range(scales)]
    assert model(images(1), ["car"]).shape == (1, 1, 64, 64)


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_prompt_depths(layers):
    config = tiny_config()
    config.prompts.visual_layers = layers  # 0: no prompts, 1: shallow, 3: every layer
    model = ClipCount(config).eval()
    assert model.encode_image(images(1)).shape == (1, 16, 32)  # 4x4 patches of width 32


def test_bad_input_says_what_was_expected(model):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 64, 64), ["car"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(1, 4, 64, 64), ["car"])
    with pytest.raises(PromptError, match="empty"):
        model(images(1), [])
    with pytest.raises(PromptError, match="one prompt per image"):
        model(images(2), ["car"])
    with pytest.raises(PromptError, match="empty"):
        model(images(1), ["   "])
    with pytest.raises(PromptError, match="list"):
        model(images(1), "car")


def test_checkpoint_round_trip_is_strict(tmp_path, model):
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config
    x = images(1)
    with torch.no_grad():
        assert torch.allclose(loaded(x, ["car"]), model(x, ["car"]), atol=1e-5)
    loaded = load_model(tmp_path / "ckpt" / "model.safetensors")  # the weights file also names the checkpoint
    other = tiny_config()
    other.interaction.heads = 4
    other.decoder.channels = (8, 8, 8, 8)
    save_model(ClipCount(other), tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "other")
    with pytest.raises(CheckpointError, match="not a clipcount checkpoint"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing")


def test_config_round_trips_through_json():
    config = ClipCountConfig()
    assert ClipCountConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        ClipCountConfig.from_dict({"colour": "red"})


def similarity_model() -> ClipCount:
    cfg = tiny_config()
    cfg.text_similarity = True
    torch.manual_seed(0)
    return ClipCount(cfg).eval()


def test_text_similarity_gives_the_decoder_the_patch_text_cosine_map():
    model = similarity_model()
    with torch.no_grad():
        tokens, text = model.encode_image(images(2)), model.encode_text(["car", "red circles"])
        maps = model.interaction_maps(tokens, text)
        grid = int(tokens.shape[1] ** 0.5)
        cosine = torch.nn.functional.cosine_similarity(model.contrastive_features(tokens), text, dim=-1)  # (B, N)
    width = model.config.interaction.width
    assert all(m.shape[1] == width + 1 for m in maps)
    assert torch.allclose(maps[0][:, -1], cosine.view(2, grid, grid), atol=1e-5)
    assert model.decoder.convs[0][0].in_channels == width + 1
    # the map reaches the density: change the contrastive head and the density changes
    before = model(images(2), ["car", "red circles"])
    with torch.no_grad():
        model.patch_feat_proj_contrast.weight.mul_(-1)
    assert not torch.allclose(model(images(2), ["car", "red circles"]), before)


def test_text_similarity_trains_the_contrastive_head_through_the_density():
    model = similarity_model().train()
    model(images(2), ["car", "red circles"]).sum().backward()
    assert model.patch_feat_proj_contrast.weight.grad is not None
    assert model.patch_feat_proj_contrast.weight.grad.abs().sum() > 0


def test_text_similarity_round_trips_and_is_refused_in_compat_models(tmp_path):
    model = similarity_model()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.config.text_similarity
    with torch.no_grad():
        assert torch.allclose(loaded(images(1), ["car"]), model(images(1), ["car"]), atol=1e-5)
    cfg = tiny_config(compat=True)
    cfg_dict = cfg.to_dict()
    cfg_dict["text_similarity"] = True
    from clipcount.errors import ConfigError

    with pytest.raises(ConfigError, match="text_similarity"):
        ClipCountConfig.from_dict(cfg_dict)


def test_image_height_round_trips_and_bad_values_are_refused(tmp_path):
    from clipcount.errors import ConfigError

    cfg = tiny_config()
    cfg.image_height = 96
    model = ClipCount(cfg)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.image_height == 96 and loaded.config.resize_height == 96
    assert tiny_config().resize_height == tiny_config().window_size  # None: the window size
    data = tiny_config().to_dict()
    with pytest.raises(ConfigError, match="image_height"):
        ClipCountConfig.from_dict({**data, "image_height": data["window_size"] - 1})
    with pytest.raises(ConfigError, match="one row"):
        ClipCountConfig.from_dict({**data, "image_height": 96, "windowing": "published"})
