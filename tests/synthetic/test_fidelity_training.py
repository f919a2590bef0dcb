"""Training that makes the prompt matter, in the synthetic world: several prompts per crop, negative
prompts with all-zero targets, hard negatives one attribute off, and no held-out class in any
training stage (scenes, counting prompts, captions, region targets, region texts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipcount.errors import ConfigError
from clipcount.synthetic.prompts import (
    ALL_CLASSES,
    HELD_OUT,
    TRAIN_CLASSES,
    differs_in_one_attribute,
    hard_negatives,
    parse_prompt,
)
from clipcount.synthetic.regions import RegionTexts
from clipcount.synthetic.stream import CaptionStream, CountingStream, class_fractions, crop_scene
from clipcount.synthetic.world import WorldConfig, make_scene

WORLD = WorldConfig(height=128, min_width=128, max_width=224, min_size=8.0, max_size=24.0, max_per_class=12,
                    classes_per_scene=(1, 4))
CROP = 128


def test_hard_negatives_differ_in_exactly_one_attribute():
    assert differs_in_one_attribute(("red", "star"), ("blue", "star"))
    assert differs_in_one_attribute(("red", "star"), ("red", "circle"))
    assert not differs_in_one_attribute(("red", "star"), ("red", "star"))  # zero attributes
    assert not differs_in_one_attribute(("red", "star"), ("blue", "circle"))  # two attributes
    present = [("red", "star"), ("blue", "circle")]
    hard = hard_negatives(present, TRAIN_CLASSES)
    assert hard and not set(hard) & set(present)
    for c in hard:
        assert any(differs_in_one_attribute(c, p) for p in present)
    expected = {c for c in TRAIN_CLASSES if c not in present and any(differs_in_one_attribute(c, p) for p in present)}
    assert set(hard) == expected


def test_negative_prompts_get_all_zero_targets():
    stream = CountingStream(24, seed=3, world=WORLD, crop_size=CROP, prompts_per_image=4, negative_share=1.0,
                            hard_negative_share=0.5, density_sigma=2.0)
    negatives = 0
    for i in range(len(stream)):
        item = stream[i]
        assert item["density"].shape == (4, 1, CROP, CROP) and item["count"].shape == (4,)
        crop = crop_scene(*_crop_of(stream, i))
        present = set(crop.class_counts())
        for prompt, density, count in zip(item["prompts"], item["density"], item["count"]):
            colour, shape = parse_prompt(prompt)
            assert float(count) == len(crop.points(colour, shape))
            assert float(density.sum()) == pytest.approx(60.0 * float(count), abs=1e-3)
        for prompt, density, count in list(zip(item["prompts"], item["density"], item["count"]))[1:]:
            if present:  # every further slot is a negative: nothing of it in the crop, a zero map
                negatives += 1
                assert float(count) == 0.0 and float(density.abs().max()) == 0.0
    assert negatives > 20


def test_blank_crops_are_background_with_all_zero_targets():
    from clipcount.synthetic.prompts import TRAIN_CLASSES

    kwargs = dict(seed=5, world=WORLD, crop_size=CROP, prompts_per_image=3, negative_share=0.5, density_sigma=2.0)
    plain = CountingStream(12, **kwargs)
    blank = CountingStream(12, blank_share=1.0, **kwargs)
    for i in range(len(blank)):
        item = blank[i]
        assert item["image"].shape == (3, CROP, CROP) and item["density"].shape == (3, 1, CROP, CROP)
        assert float(item["count"].abs().sum()) == 0.0 and float(item["density"].abs().max()) == 0.0
        assert all(parse_prompt(p) in TRAIN_CLASSES or parse_prompt(p)[0] is None for p in item["prompts"])
        assert float(item["image"].std()) > 0.0  # a textured background, not a flat fill
    shares = CountingStream(200, blank_share=0.25, **{**kwargs, "prompts_per_image": 1})
    n_blank = sum(float(shares[i]["density"].abs().max()) == 0.0 for i in range(len(shares)))
    assert 25 <= n_blank <= 80  # about a quarter (a present-class crop is never all zero)
    # without blank crops the data is what it was before the option existed
    assert torch.equal(plain[0]["image"], CountingStream(12, blank_share=0.0, **kwargs)[0]["image"])
    with pytest.raises(ConfigError, match="blank_share"):
        CountingStream(4, blank_share=1.5, **kwargs)


def test_hard_negative_prompts_are_one_attribute_off():
    stream = CountingStream(24, seed=4, world=WORLD, crop_size=CROP, prompts_per_image=3, negative_share=1.0,
                            hard_negative_share=1.0)
    checked = 0
    for i in range(len(stream)):
        item = stream[i]
        present = sorted(crop_scene(*_crop_of(stream, i)).class_counts())
        if not present:
            continue
        for prompt in item["prompts"][1:]:
            colour, shape = parse_prompt(prompt)
            assert colour is not None and (colour, shape) not in present
            assert any(differs_in_one_attribute((colour, shape), p) for p in present)
            checked += 1
    assert checked > 10


def test_held_out_classes_never_reach_any_training_stage():
    counting = CountingStream(60, seed=1, world=WORLD, crop_size=CROP, prompts_per_image=4, negative_share=0.5)
    for i in range(len(counting)):
        for prompt in counting[i]["prompts"]:
            colour, shape = parse_prompt(prompt)
            assert colour is None or (colour, shape) not in HELD_OUT
    captions = CaptionStream(60, context_length=32, seed=1, world=WORLD, crop_size=CROP, patch_grid=8)
    held_columns = [1 + ALL_CLASSES.index(c) for c in HELD_OUT]
    for i in range(len(captions)):
        item = captions[i]
        assert item["class_fractions"].shape == (64, 1 + len(ALL_CLASSES))
        assert float(item["class_fractions"][:, held_columns].sum()) == 0.0
        for colour, shape in HELD_OUT:
            assert f"{colour} {shape}" not in item["caption"]
    texts = RegionTexts.build()
    for colour, shape in HELD_OUT:
        assert not any(colour in t and shape in t for t in texts.texts)
    with pytest.raises(Exception):
        CountingStream(4, world=WorldConfig(mode="test"))


def test_class_fractions_cover_what_is_drawn():
    scene = make_scene(np.random.default_rng(5), WorldConfig(mode="test", height=128, min_width=160, max_width=160,
                                                             min_size=20.0, max_size=30.0, max_per_class=5))
    fractions = class_fractions(scene, 16, 0, 128, 8)  # (64, 37)
    assert np.allclose(fractions.sum(1), 1.0)
    inside = crop_scene(scene, 16, 0, 128)
    for o in inside.objects:  # the patch under an object's centre is covered by that class
        row, col = int(o.y // 16), int(o.x // 16)
        assert fractions[row * 8 + col, 1 + ALL_CLASSES.index((o.colour, o.shape))] > 0
    present = {1 + ALL_CLASSES.index(c) for c in scene.class_counts()}
    assert set(np.flatnonzero(fractions[:, 1:].sum(0)) + 1) <= present


def test_region_targets_sum_classes_to_shapes_and_colours():
    texts = RegionTexts.build()
    fractions = torch.zeros(1, 2, 1 + len(ALL_CLASSES))
    fractions[0, 0, 0] = 1.0  # background
    red_star, blue_star = 1 + ALL_CLASSES.index(("red", "star")), 1 + ALL_CLASSES.index(("blue", "circle"))
    fractions[0, 1, [0, red_star, blue_star]] = torch.tensor([0.5, 0.25, 0.25])
    class_t, shape_t, colour_t = texts.targets(fractions)
    names = texts.texts
    (c0, c1), (s0, s1), (k0, k1) = texts.heads
    assert class_t[0, 0, 0] == 1 and shape_t[0, 0, 0] == 1 and colour_t[0, 0, 0] == 1
    assert shape_t[0, 1, names[s0:s1].index("stars")] == pytest.approx(0.25)
    assert colour_t[0, 1, names[k0:k1].index("red objects")] == pytest.approx(0.25)
    assert class_t[0, 1, names[c0:c1].index("red stars")] == pytest.approx(0.25)


def _crop_of(stream: CountingStream, index: int):
    """The (scene, x0, y0, size) an item of the stream was cut from (its seeding, replayed)."""
    from clipcount.synthetic.stream import _CROP_TAG, random_offset

    scene = stream.scene(index)
    x0, y0 = random_offset(scene, stream._rng(index, _CROP_TAG), stream.crop_size)
    return scene, x0, y0, stream.crop_size
