"""Stage 0 of synthetic CLIP pretraining (`synthetic/stem.py`) and the convolutional stem it trains:
the stem has CLIP's token shapes, object crops are centred on one object of a training class,
stage 0 changes only the stem, then stage 1 keeps it frozen, and an interrupted run never repeats it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from clipcount.config import CLIPConfig, TextConfig, VisionConfig
from clipcount.errors import ConfigError
from clipcount.modeling.clip import CLIP, ConvStem, HybridStem
from clipcount.synthetic.prompts import COLOURS, HELD_OUT, SHAPES
from clipcount.synthetic.world import WorldConfig

WORLD = WorldConfig(height=128, min_width=128, max_width=256, min_size=6.0, max_size=24.0, max_per_class=40)
CONV_CLIP = CLIPConfig(
    VisionConfig(image_size=64, patch_size=16, width=32, layers=1, heads=2, stem="conv"),
    TextConfig(context_length=32, width=32, layers=1, heads=2),
    embed_dim=16,
)


def test_conv_stem_makes_the_tokens_a_patchify_would():
    for patch, size in ((16, 64), (8, 48)):
        vision = VisionConfig(image_size=size, patch_size=patch, width=32, layers=1, heads=2, stem="conv")
        clip = CLIP(CLIPConfig(vision, CONV_CLIP.text, embed_dim=16))
        assert isinstance(clip.visual.conv1, ConvStem)
        grid = size // patch
        assert clip.visual.conv1(torch.rand(2, 3, size, size)).shape == (2, 32, grid, grid)
        assert clip.visual.tokens(torch.rand(2, 3, size, size)).shape == (2, 1 + grid * grid, 32)
    with pytest.raises(ConfigError, match="power of 2"):
        VisionConfig(patch_size=14, stem="conv")
    with pytest.raises(ConfigError, match="stem"):
        VisionConfig(stem="resnet")
    assert isinstance(CLIP(dataclasses.replace(CONV_CLIP, vision=VisionConfig(
        image_size=64, patch_size=16, width=32, layers=1, heads=2))).visual.conv1, torch.nn.Conv2d)


def test_hybrid_stem_sums_a_conv_stem_and_a_linear_patchify():
    vision = VisionConfig(image_size=64, patch_size=16, width=32, layers=1, heads=2, stem="hybrid")
    stem = CLIP(CLIPConfig(vision, CONV_CLIP.text, embed_dim=16)).visual.conv1
    assert isinstance(stem, HybridStem)
    images = torch.rand(2, 3, 64, 64)
    tokens = stem(images)  # (B, width, 4, 4)
    assert tokens.shape == (2, 32, 4, 4)
    torch.testing.assert_close(tokens, stem.layers(images) + stem.patchify(images))
    # the patchify is CLIP's: one linear map of each patch's pixels, no bias
    assert stem.patchify.weight.shape == (32, 3, 16, 16) and stem.patchify.bias is None
    with pytest.raises(ConfigError, match="power of 2"):
        VisionConfig(patch_size=14, stem="hybrid")


def test_object_crops_are_centred_on_one_training_object():
    from clipcount.synthetic.stem import OBJECTS_PER_SCENE, ObjectCrops

    crops = ObjectCrops(6, crop=24, world=WORLD, seed=3)
    item = crops[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape[1:] == (3, 24, 24)
    assert 1 <= len(item["label"]) <= OBJECTS_PER_SCENE
    for shape, colour in item["label"].tolist():
        assert (COLOURS[colour], SHAPES[shape]) not in HELD_OUT
    assert torch.equal(crops[0]["image"], item["image"])  # deterministic per index
    with pytest.raises(ConfigError, match="held-out"):
        ObjectCrops(2, 24, WORLD.replace(mode="test"))


@pytest.mark.parametrize("kind", ["conv", "hybrid"])
def test_stage_zero_trains_only_the_stem(kind):
    from clipcount.synthetic.stem import StemPretrainConfig, pretrain_stem

    torch.manual_seed(0)
    clip = CLIP(dataclasses.replace(CONV_CLIP, vision=dataclasses.replace(CONV_CLIP.vision, stem=kind)))
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    result = pretrain_stem(clip, StemPretrainConfig(steps=3, scenes_per_batch=4, window=128), WORLD, progress=False)
    assert result["steps"] == 3 and 0.0 <= result["shape_accuracy"] <= 1.0 and 0.0 <= result["colour_accuracy"] <= 1.0
    changed = {k for k, v in clip.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("visual.conv1.") for k in changed)
    if kind == "hybrid":  # both halves learn
        assert "visual.conv1.patchify.weight" in changed and any(".layers." in k for k in changed)
    with pytest.raises(ConfigError, match="convolutional stem"):
        pretrain_stem(CLIP(dataclasses.replace(CONV_CLIP, vision=VisionConfig(
            image_size=64, patch_size=16, width=32, layers=1, heads=2))), StemPretrainConfig(steps=1), WORLD,
            progress=False)


def test_stage_zero_takes_its_own_workers_and_threads_and_gives_the_threads_back(tmp_path, monkeypatch):
    """PretrainConfig.stem_workers / stem_threads reach stage 0 (it waits on drawing scenes), the
    process's thread count is restored after it, and its precision follows PretrainConfig's."""
    from clipcount.synthetic import stem
    from clipcount.synthetic.pretrain import pretrain_clip

    seen = []
    real = stem._train_stem

    def spy(clip, cfg, world, seed, num_workers, device, progress):
        seen.append((num_workers, torch.get_num_threads(), cfg.precision))
        return real(clip, cfg, world, seed, num_workers, device, progress)

    monkeypatch.setattr(stem, "_train_stem", spy)
    threads = torch.get_num_threads()
    cfg = _pretrain_cfg(steps=1, stem_workers=1, stem_threads=1, precision="bf16")
    assert pretrain_clip(CONV_CLIP, cfg, tmp_path, device="cpu", progress=False).finished
    assert seen == [(1, 1, "bf16")] and torch.get_num_threads() == threads
    seen.clear()
    assert pretrain_clip(CONV_CLIP, _pretrain_cfg(steps=1), tmp_path / "plain", device="cpu", progress=False).finished
    assert seen == [(0, threads, "auto")]  # unset: the pretraining's workers, threads left alone


def _pretrain_cfg(**changes):
    from clipcount.synthetic.pretrain import PretrainConfig

    base = PretrainConfig(steps=4, batch_size=4, warmup_steps=2, crop_size=128, num_workers=0, checkpoint_every=2,
                          log_every=1, world=dataclasses.asdict(WORLD), region_weight=1.0, stem_steps=2)
    return dataclasses.replace(base, **changes)


def test_stage_one_keeps_the_stem_of_stage_zero(tmp_path, monkeypatch):
    from clipcount.synthetic import stem
    from clipcount.synthetic.pretrain import STEM_REPORT, load_clip, pretrain_clip

    result = pretrain_clip(CONV_CLIP, _pretrain_cfg(), tmp_path / "run", device="cpu", progress=False)
    assert result.finished
    report = json.loads((tmp_path / "run" / STEM_REPORT).read_text())
    assert report["steps"] == 2
    final = load_clip(tmp_path / "run")
    assert isinstance(final.visual.conv1, ConvStem)

    # the stem leaves stage 0 and is never changed again: a run with one step of stage 1 (same seed,
    # so the same stage 0) ends with the same stem as the four-step run, and another transformer
    calls = []
    real = stem.pretrain_stem
    monkeypatch.setattr(stem, "pretrain_stem", lambda *a, **k: calls.append(1) or real(*a, **k))
    short = pretrain_clip(CONV_CLIP, _pretrain_cfg(steps=1), tmp_path / "short", device="cpu", progress=False)
    assert short.finished and calls == [1]
    stem_only = load_clip(tmp_path / "short").state_dict()
    for key, value in final.state_dict().items():
        if key.startswith("visual.conv1."):
            assert torch.allclose(value, stem_only[key], atol=1e-6), key
    assert any(not torch.allclose(v, stem_only[k], atol=1e-6) for k, v in final.state_dict().items()
               if k.startswith("visual.transformer."))


def test_an_interrupted_run_does_not_repeat_stage_zero(tmp_path, monkeypatch, interrupt_pretraining):
    from clipcount.synthetic import stem
    from clipcount.synthetic.pretrain import pretrain_clip

    restore = interrupt_pretraining(2)  # Ctrl-C during the second step of stage 1
    with pytest.raises(KeyboardInterrupt):
        pretrain_clip(CONV_CLIP, _pretrain_cfg(), tmp_path, device="cpu", progress=False)
    restore()
    calls = []
    monkeypatch.setattr(stem, "pretrain_stem", lambda *a, **k: calls.append(1))
    assert pretrain_clip(CONV_CLIP, _pretrain_cfg(), tmp_path, device="cpu", progress=False).finished
    assert calls == []


def test_probe_says_what_a_stem_knows():
    """`patch_probe` works on a conv-stem CLIP (the recipe's before/after measurement)."""
    from clipcount.synthetic.regions import patch_probe

    vision = VisionConfig(image_size=128, patch_size=16, width=32, layers=1, heads=2, stem="conv")
    probe = patch_probe(CLIP(dataclasses.replace(CONV_CLIP, vision=vision)), n_train=3, n_test=2, crop=128)
    assert {"colour", "shape"} <= set(probe) and np.isfinite(probe["colour"])
