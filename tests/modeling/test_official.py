"""The converted published checkpoint reproduces the published code's own outputs, stage by stage."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from clipcount.errors import CheckpointError
from clipcount.modeling.checkpoint import load_model
from clipcount.modeling.official import convert_official, read_official_checkpoint

from .official_rule import REFERENCE, read_key_list, write_official_checkpoint

COMPAT = REFERENCE / "compat"
pytestmark = pytest.mark.skipif(not COMPAT.is_dir(), reason="shared/reference/compat is not beside the checkout")


def rel_max_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    theirs = torch.from_numpy(theirs)
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("official")
    # Lightning stores hyper-parameters as a Namespace beside the weights: it must be read, not refused
    ckpt = write_official_checkpoint(tmp / "clipcount.ckpt", extra={"hyper_parameters": argparse.Namespace(lr=1e-4, decoder_head=4), "epoch": 3})
    return convert_official(ckpt, tmp / "converted")


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


def test_text_embedding_matches(outputs):
    assert rel_max_diff(outputs["text"], np.load(COMPAT / "text_embedding.npy")) <= 1e-4


def test_image_tokens_match(outputs):
    assert rel_max_diff(outputs["tokens"], np.load(COMPAT / "image_tokens.npy")) <= 1e-4


def test_interaction_maps_match(outputs):
    assert rel_max_diff(outputs["maps"][0], np.load(COMPAT / "map14.npy")) <= 1e-4
    assert rel_max_diff(outputs["maps"][1], np.load(COMPAT / "map28.npy")) <= 1e-4


def test_density_and_counts_match(outputs):
    expected = np.load(COMPAT / "density.npy")
    assert rel_max_diff(outputs["density"][:, 0], expected) <= 1e-4
    assert torch.equal(outputs["density"], outputs["full"])
    counts = outputs["model"].count(outputs["full"]).numpy()
    want = json.loads((COMPAT / "expected.json").read_text())["counts"]
    np.testing.assert_allclose(counts, want, rtol=1e-4)


def test_compat_reproduces_the_shared_one_token_embedding(outputs):
    text = outputs["text"]
    assert torch.equal(text[0], text[1])  # "car" and "apples": the published end-of-text bug


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
