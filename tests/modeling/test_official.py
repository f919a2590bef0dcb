"""The converted published checkpoint reproduces the published code's own outputs, stage by stage,
in every form the checkpoint comes in; its architecture is read from its hyper_parameters."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import types

import numpy as np
import pytest
import torch

from clipcount.errors import CheckpointError
from clipcount.modeling.checkpoint import load_model
from clipcount.modeling.official import (
    PublishedSettings,
    build_official_model,
    hyper_parameters,
    load_official_file,
    published_settings,
    read_official_checkpoint,
)

from .conftest import HAVE_REFERENCE
from .official_rule import REFERENCE, read_key_list, write_checkpoint

COMPAT = REFERENCE / "compat"
needs_reference = pytest.mark.skipif(not HAVE_REFERENCE, reason="shared/reference/compat is not beside the checkout")


def rel_max_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    theirs = torch.from_numpy(theirs)
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture(scope="module")
def conversion(rule_files):
    """`clipcount convert-official` on the full file (Lightning's Namespace hyper_parameters)."""
    from clipcount.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["convert-official", str(rule_files.full), str(rule_files.tmp / "converted")])
    assert code == 0, err.getvalue()
    return rule_files.tmp / "converted", err.getvalue()


@pytest.fixture(scope="module")
def converted(conversion):
    return conversion[0]


@pytest.fixture(scope="module")
def outputs(converted):
    model = load_model(converted)
    assert model.config.compat
    images = torch.from_numpy(np.random.default_rng(2024).random((4, 3, 384, 384), dtype=np.float32))
    prompts = json.loads((COMPAT / "expected.json").read_text())["prompts"]
    with torch.no_grad():
        tokens = model.visual_prompts(model.clip.visual, model.preprocess(images))
        text = model.encode_text(prompts)
        maps = model.interaction_maps(tokens[:, 1:], text)
        density = model.decode(maps, (384, 384))
        full = model(images, prompts)
    return dict(text=text, tokens=tokens, maps=maps, density=density, full=full, model=model)


@needs_reference
def test_text_embedding_matches(outputs):
    assert rel_max_diff(outputs["text"], np.load(COMPAT / "text_embedding.npy")) <= 1e-4


@needs_reference
def test_image_tokens_match(outputs):
    assert rel_max_diff(outputs["tokens"], np.load(COMPAT / "image_tokens.npy")) <= 1e-4


@needs_reference
def test_interaction_maps_match(outputs):
    assert rel_max_diff(outputs["maps"][0], np.load(COMPAT / "map14.npy")) <= 1e-4
    assert rel_max_diff(outputs["maps"][1], np.load(COMPAT / "map28.npy")) <= 1e-4


@needs_reference
def test_density_and_counts_match(outputs):
    expected = np.load(COMPAT / "density.npy")
    assert rel_max_diff(outputs["density"][:, 0], expected) <= 1e-4
    assert torch.equal(outputs["density"], outputs["full"])
    counts = outputs["model"].count(outputs["full"]).numpy()
    want = json.loads((COMPAT / "expected.json").read_text())["counts"]
    np.testing.assert_allclose(counts, want, rtol=1e-4)


@needs_reference
def test_compat_reproduces_the_shared_one_token_embedding(outputs):
    text = outputs["text"]
    assert torch.equal(text[0], text[1])  # "car" and "apples": the published end-of-text bug


@needs_reference
def test_every_source_tensor_lands_and_every_parameter_is_filled(converted):
    from clipcount.modeling.official import rename_official

    state = load_model(converted).state_dict()
    # every published key has a home (shared CLIP copies share one) and every model key has a source
    renamed = rename_official({k: torch.zeros(1) for k, _ in read_key_list()}, "keys")
    assert set(renamed) == set(state)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_inconsistent_shared_copies_are_refused(tmp_path):
    ckpt = tmp_path / "bad.ckpt"
    state = {k: torch.zeros(1) for k in ("model.fim_blocks.0.norm0.weight",)}
    state["model.clip.ln_final.weight"] = torch.ones(3)
    state["model.text_encoder.clip_model.ln_final.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, ckpt)
    from clipcount.modeling.official import rename_official

    with pytest.raises(CheckpointError, match="differs from its shared copy"):
        rename_official(read_official_checkpoint(ckpt), str(ckpt))


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": Evil()}, ckpt)
    with pytest.raises(CheckpointError, match="safely"):
        read_official_checkpoint(ckpt)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        read_official_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_official_checkpoint(tmp_path / "missing.ckpt")


# ---- the released form, hyper-parameters, refusals ---------------------------------------------

def test_conversion_records_the_settings_and_the_published_windowing(converted, conversion):
    data = json.loads((converted / "config.json").read_text())
    assert data["clipcount"]["windowing"] == "published"  # clipcount eval reproduces the paper's protocol
    assert data["clipcount"]["interaction"]["heads"] == 4  # read from hyper_parameters, not assumed
    assert data["published_settings"]["decoder_head"] == 4
    notes = conversion[1]
    assert "hyper_parameters lack" in notes and "run.py's default" in notes  # the Namespace held lr and heads only


def test_released_file_without_clip_gives_the_same_model(rule_files, converted):
    """The ~85-key file plus CLIP from a separate OpenAI-layout file: the very same weights and config."""
    notes = []
    model, extra = build_official_model(rule_files.released, clip=rule_files.clip_file, say=notes.append)
    assert len(rule_files.released_state) < 100  # the published run.py's save drops every CLIP copy
    reference = load_model(converted)
    assert model.config.to_dict() == reference.config.to_dict()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any("holds no CLIP weights" in n and "quick_gelu (assumed" in n for n in notes)
    assert extra["clip_weights"] == str(rule_files.clip_file)


def test_eight_heads_are_read_and_used(rule_files, tmp_path):
    """Heads show in no tensor shape: 8 (run.py's default) must come from hyper_parameters and change
    the interaction, while the encoders (which do not depend on them) still match."""
    ckpt = write_checkpoint(tmp_path / "eight.ckpt", rule_files.released_state, {"decoder_head": 8})
    model, _ = build_official_model(ckpt, clip=rule_files.clip_folder)
    assert model.config.interaction.heads == 8
    assert all(block.selfattn.heads == 8 and block.attn.heads == 8 for block in model.interaction.fim_blocks)
    image = torch.from_numpy(np.random.default_rng(2024).random((4, 3, 384, 384), dtype=np.float32))[:1]
    with torch.no_grad():
        tokens = model.visual_prompts(model.clip.visual, model.preprocess(image))
        maps = model.interaction_maps(tokens[:, 1:], model.encode_text(["car"]))
    assert rel_max_diff(tokens, np.load(COMPAT / "image_tokens.npy")[:1]) <= 1e-4
    assert rel_max_diff(maps[0], np.load(COMPAT / "map14.npy")[:1]) > 1e-3  # 4-head vectors: heads matter


def test_without_hyper_parameters_run_py_defaults_apply_and_are_said():
    notes = []
    settings = published_settings(None, notes.append)
    assert settings == PublishedSettings() and settings.decoder_head == 8
    assert len(notes) == 1 and "no hyper_parameters" in notes[0] and "decoder_head=8" in notes[0]


def test_hyper_parameter_values_are_typed_and_checked():
    settings = published_settings({"decoder_head": "4", "use_coop": "False", "vpt_depth": 6.0}, lambda _: None)
    assert (settings.decoder_head, settings.use_coop, settings.vpt_depth) == (4, False, 6)
    with pytest.raises(CheckpointError, match="use_vpt='maybe'"):
        published_settings({"use_vpt": "maybe"})


def _fake_attribute_dict_class():
    """A class pickled under Lightning's AttributeDict path (Lightning itself is not needed)."""
    module = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = module.__name__
    AttributeDict.__qualname__ = "AttributeDict"
    module.AttributeDict = AttributeDict
    return module, AttributeDict


@pytest.mark.parametrize("container", ["namespace", "dict", "attribute_dict", "nested"])
def test_hyper_parameters_in_every_container_lightning_writes(tmp_path, monkeypatch, container):
    values = {"decoder_head": 4, "vpt_depth": 6, "lr": 1e-4}
    if container == "namespace":
        hparams = argparse.Namespace(**values)
    elif container == "dict":
        hparams = values
    elif container == "nested":
        hparams = {"args": argparse.Namespace(**values)}
    else:
        module, attribute_dict = _fake_attribute_dict_class()
        for name in ("pytorch_lightning", "pytorch_lightning.utilities", module.__name__):
            monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
        hparams = attribute_dict(values)
    ckpt = write_checkpoint(tmp_path / "h.ckpt", {"model.fim_blocks.0.norm0.weight": torch.ones(2)}, hparams,
                            callbacks={"best_model_score": torch.tensor(17.2), "best_k": np.float64(17.2)})
    if container == "attribute_dict":
        for name in ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
            monkeypatch.delitem(sys.modules, name)  # read without Lightning, by the allow-list alone
    found = hyper_parameters(load_official_file(ckpt))
    assert found["decoder_head"] == 4 and found["vpt_depth"] == 6
    assert published_settings(found, lambda _: None).decoder_head == 4


@pytest.mark.parametrize("setting, match", [
    ({"use_fim": True, "use_mixed_fim": False}, "use_fim=True"),
    ({"use_mixed_fim": False}, "use_mixed_fim=False"),
    ({"use_vpt": False}, "use_vpt=False"),
    ({"vpt_depth": 1}, "vpt_depth=1"),
    ({"vpt_depth": 12}, "vpt_depth=12"),
    ({"decoder_head": 5}, "decoder_head=5"),
    ({"backbone": "rn50"}, "backbone='rn50'"),
    ({"backbone": "l14"}, "pyradim_conv"),
    ({"coop_width": 0}, "coop_width=0"),
])
def test_settings_compat_cannot_reproduce_are_refused(setting, match):
    with pytest.raises(CheckpointError, match=match) as caught:
        published_settings(setting)
    assert "compat mode does not reproduce" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("backbone, activation, match", [("b32", None, "patch size 16.*b32 is ViT-B/32"),
                                                         ("b16", "gelu", "quick_gelu")])
def test_a_clip_that_does_not_fit_is_refused_by_name(rule_files, tmp_path, backbone, activation, match):
    ckpt = write_checkpoint(tmp_path / "b.ckpt", rule_files.released_state, {"decoder_head": 4, "backbone": backbone})
    with pytest.raises(CheckpointError, match=match) as caught:
        build_official_model(ckpt, clip=rule_files.clip_file, clip_activation=activation)
    assert str(rule_files.clip_file) in str(caught.value)


def test_offline_without_clip_names_the_flag_and_where_the_weights_are(rule_files, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError) as caught:
        build_official_model(rule_files.released)  # no --clip: the default is fetched from the hub
    message = str(caught.value)
    assert "--clip" in message and "huggingface.co/openai/clip-vit-base-patch16" in message
    assert "\n" not in message


def test_a_fine_tuned_clip_that_was_dropped_is_refused(tmp_path):
    ckpt = write_checkpoint(tmp_path / "u.ckpt", {"model.fim_blocks.0.norm0.weight": torch.ones(2)},
                            {"unfreeze_vit": True})
    with pytest.raises(CheckpointError, match="unfreeze_vit=True"):
        build_official_model(ckpt, clip="unused")


def test_cli_errors_are_one_line(tmp_path, capsys):
    from clipcount.cli import main

    ckpt = write_checkpoint(tmp_path / "f.ckpt", {"model.fim_blocks.0.norm0.weight": torch.ones(2)}, {"use_fim": True})
    assert main(["convert-official", str(ckpt), str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("clipcount: error:") and "use_fim=True" in errors[0]
    assert not (tmp_path / "out").exists()


# ---- whole images: the published evaluation windowing ------------------------------------------

@pytest.fixture(scope="module")
def compat_model(converted):
    return load_model(converted)


@needs_reference
@pytest.mark.parametrize("case", json.loads((COMPAT / "wide_expected.json").read_text()) if HAVE_REFERENCE else [],
                         ids=lambda case: f"w{case['width']}")
def test_whole_images_match_the_published_evaluation(compat_model, case):
    from clipcount.engine.inference import DensityPredictor

    image = torch.from_numpy(np.random.default_rng(case["seed"]).random((1, 3, 384, case["width"]), dtype=np.float32))
    predictor = DensityPredictor(compat_model, stride=128, device="cpu", precision="fp32")
    assert predictor.windowing == "published"  # the converted model's default
    density = predictor.predict(image[0], [case["prompt"]])[0]
    expected = np.load(COMPAT / f"wide_density_{case['width']}.npy")
    assert density.shape == expected.shape
    assert rel_max_diff(density, expected) <= 1e-4
    assert predictor.count(density) == pytest.approx(case["count"], rel=1e-4)


@needs_reference
def test_clipcount_windowing_is_not_the_published_one(compat_model):
    """The proof above must be able to fail: clipcount's own windowing gives other counts."""
    from clipcount.engine.inference import DensityPredictor

    case = json.loads((COMPAT / "wide_expected.json").read_text())[0]
    image = torch.from_numpy(np.random.default_rng(case["seed"]).random((1, 3, 384, case["width"]), dtype=np.float32))
    predictor = DensityPredictor(compat_model, stride=128, device="cpu", precision="fp32", windowing="clipcount")
    density = predictor.predict(image[0], [case["prompt"]])[0]
    assert rel_max_diff(density, np.load(COMPAT / f"wide_density_{case['width']}.npy")) > 1e-3


def test_other_run_py_settings_convert_and_run(rule_files, tmp_path):
    """Settings the released model does not use: 6 prompted layers of 8 tokens, no text context,
    16 heads. The file's own tensors decide nothing the hyper_parameters say otherwise."""
    state = {k: v for k, v in rule_files.released_state.items() if "learnable_context" not in k}
    state["model.img_encoder.visual_prompt"] = state["model.img_encoder.visual_prompt"][:6, :8].clone()
    hparams = {"decoder_head": 16, "vpt_depth": 6, "vpt_width": 8, "use_coop": False}
    model, _ = build_official_model(write_checkpoint(tmp_path / "o.ckpt", state, hparams), clip=rule_files.clip_file)
    assert (model.config.prompts.visual_layers, model.config.prompts.visual_tokens) == (6, 8)
    assert model.config.prompts.text_context_tokens == 0 and model.config.interaction.heads == 16
    with torch.no_grad():
        text = model.encode_text(["car", "apples"])
        ids = model.tokenize(["car", "apples"])
        plain = model.clip.encode_text(ids)  # no context tokens: CLIP's own text feature, at the real end
        density = model(torch.rand(1, 3, 384, 384), ["car"])
    assert torch.allclose(text[:, 0], plain, atol=1e-5) and not torch.equal(text[0], text[1])
    assert density.shape == (1, 1, 384, 384) and bool(((density >= 0) & (density <= 1)).all())
    mismatched = write_checkpoint(tmp_path / "m.ckpt", state, {**hparams, "vpt_depth": 10})
    with pytest.raises(CheckpointError, match="visual_prompt.*model built from"):
        build_official_model(mismatched, clip=rule_files.clip_file)
