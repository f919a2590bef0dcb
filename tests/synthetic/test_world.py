"""The synthetic counting world: annotations equal drawn objects, held-out classes stay held out,
prompts parse, and make_dataset writes valid FSC-147 files."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from clipcount.errors import ConfigError, DataError, PromptError
from clipcount.synthetic import (
    ALL_CLASSES,
    COLOURS,
    HELD_OUT,
    SHAPES,
    TRAIN_CLASSES,
    WorldConfig,
    add_cli,
    all_class_prompts,
    caption_for,
    count_for_prompt,
    make_dataset,
    make_fidelity_scene,
    make_held_out_scene,
    make_scene,
    make_seen_scene,
    parse_prompt,
    sample_training_example,
)
from clipcount.synthetic.dataset import ANNOTATIONS, CLASS_FILE, IMAGE_DIR, SPLIT_FILE, example_for, image_rng
from clipcount.synthetic.render import COLOUR_STYLE, nearest_colour, render_objects_alone

# Small, quick scenes for tests that need many of them.
SMALL = WorldConfig(max_width=512, max_per_class=60)


def object_ids_at_points(scene) -> np.ndarray:
    """Redraw the scene's objects in drawing order, each filled with its own index as colour, and
    read the index back at every annotated point. (N,) int, -1 where no object is drawn."""
    coded = [
        dataclasses.replace(o, rgb=((i + 1) & 255, ((i + 1) >> 8) & 255, 255)) for i, o in enumerate(scene.objects)
    ]
    ids = render_objects_alone(scene.height, scene.width, coded, antialias=False).astype(np.int64)
    code = ids[..., 0] + (ids[..., 1] << 8) - 1  # (H, W)
    pts = scene.points()
    return code[pts[:, 1].astype(int), pts[:, 0].astype(int)]


# ---- annotations are exactly the drawn objects ------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_connected_components_equal_annotations_without_overlap(seed):
    cfg = WorldConfig(separation=1.6, effects=False, max_width=600)
    classes = {("red", "circle"): 25, ("blue", "cross"): 25, ("yellow", "star"): 20, ("green", "square"): 20}
    scene = make_scene(seed, cfg, classes)
    drawn = render_objects_alone(scene.height, scene.width, scene.objects, antialias=False)
    labels, n = ndimage.label(drawn.max(axis=2) > 0, structure=np.ones((3, 3)))  # 8-connected: thin tips
    assert n == len(scene.objects) > 0
    pts = scene.points().astype(int)
    hit = labels[pts[:, 1], pts[:, 0]]
    assert (hit > 0).all(), "an annotated point lies outside every drawn object"
    assert len(np.unique(hit)) == len(scene.objects), "two annotations fall on one drawn object"


@pytest.mark.parametrize("seed", range(6))
def test_every_annotated_point_shows_its_own_object(seed):
    scene, _ = sample_training_example(seed, SMALL)
    assert (object_ids_at_points(scene) == np.arange(len(scene.objects))).all()


@pytest.mark.parametrize("seed", range(6))
def test_pixel_at_each_point_has_the_labelled_colour(seed):
    scene, _ = sample_training_example(100 + seed, WorldConfig(mode="test", max_per_class=80))
    pts = scene.points().astype(int)
    found = nearest_colour(scene.image[pts[:, 1], pts[:, 0]])
    names = list(COLOUR_STYLE)
    expected = np.array([names.index(o.colour) for o in scene.objects])
    assert (found == expected).mean() == 1.0


def test_overlap_rule_and_bounds_hold_in_crowded_scenes():
    cfg = WorldConfig(max_width=448)
    classes = {c: 250 for c in [("red", "circle"), ("blue", "square"), ("green", "star"), ("purple", "cross")]}
    scene = make_scene(3, cfg, classes)
    assert len(scene.objects) > 600  # crowded scenes shrink objects instead of dropping most of them
    xy = scene.points().astype(np.float64)
    r = np.array([o.size for o in scene.objects]) / 2
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    big, small = np.maximum(r[:, None], r[None]), np.minimum(r[:, None], r[None])
    off_diagonal = ~np.eye(len(r), dtype=bool)
    assert (d[off_diagonal] >= (big + cfg.separation * small)[off_diagonal]).all()


@pytest.mark.parametrize("seed", range(10))
def test_objects_fully_inside_and_sized(seed):
    cfg = WorldConfig(mode="test")
    scene = make_scene(seed, cfg)
    assert scene.image.shape == (cfg.height, scene.width, 3) and scene.image.dtype == np.uint8
    assert cfg.min_width <= scene.width <= cfg.max_width
    boxes = scene.boxes()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= scene.width).all() and (boxes[:, 3] <= scene.height).all()
    for o in scene.objects:
        assert cfg.min_size - 1e-6 <= o.size <= cfg.max_size + 1e-6
        x1, y1, x2, y2 = o.box
        assert x1 < o.x < x2 and y1 < o.y < y2


def test_colours_are_jittered_not_single_values():
    scene = make_scene(0, SMALL, {("red", "circle"): 40})
    assert len({o.rgb for o in scene.objects}) > 20


# ---- held-out classes --------------------------------------------------------------------------

def test_held_out_is_a_latin_square_of_six_classes():
    assert len(HELD_OUT) == 6
    assert {c for c, _ in HELD_OUT} == set(COLOURS) and {s for _, s in HELD_OUT} == set(SHAPES)
    assert len(TRAIN_CLASSES) == 30 and len(ALL_CLASSES) == 36


def test_train_mode_never_emits_held_out_classes():
    rng = np.random.default_rng(0)
    cfg = WorldConfig(max_width=400, max_per_class=12, absent_prompt_prob=0.3)
    seen = set()
    for seed in range(250):
        scene, prompt = sample_training_example(seed, cfg)
        classes = set(scene.class_counts())
        assert not classes & HELD_OUT
        colour, shape = parse_prompt(prompt)
        assert (colour, shape) not in HELD_OUT
        caption = caption_for(scene, rng)
        for c, s in HELD_OUT:
            assert f"{c} {s}" not in caption, caption
        seen |= classes
    assert seen == set(TRAIN_CLASSES)  # and every training class does occur
    for seed in range(20):
        for scene, _ in (make_fidelity_scene(seed, cfg), make_seen_scene(seed, cfg)):
            assert not set(scene.class_counts()) & HELD_OUT


def test_held_out_classes_are_refused_in_train_mode():
    with pytest.raises(ConfigError, match="held out"):
        make_scene(0, WorldConfig(), {("green", "triangle"): 3})
    with pytest.raises(ConfigError):
        make_held_out_scene(0, WorldConfig(mode="train"))
    with pytest.raises(DataError, match="held-out"):
        caption_for(make_scene(0, WorldConfig(mode="test"), {("blue", "star"): 2}), np.random.default_rng(0))


def test_held_out_scenes_prompt_a_held_out_class():
    for seed in range(6):
        scene, prompt = make_held_out_scene(seed)
        assert parse_prompt(prompt) in HELD_OUT
        assert scene.count(prompt) >= 1


def test_fidelity_scenes_prompt_a_minority_class():
    for seed in range(6):
        scene, prompt = make_fidelity_scene(seed, WorldConfig(mode="test"))
        n = scene.count(prompt)
        assert 1 <= n <= 15
        target = parse_prompt(prompt)
        others = [k for c, k in scene.class_counts().items() if c != target]
        assert max(others) >= 45 and max(others) > 3 * n


# ---- determinism -------------------------------------------------------------------------------

def test_same_seed_same_scene_and_different_seed_different_scene():
    a, pa = sample_training_example(7, SMALL)
    b, pb = sample_training_example(np.random.default_rng(7), SMALL)
    c, _ = sample_training_example(8, SMALL)
    assert pa == pb and a.objects == b.objects and np.array_equal(a.image, b.image)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_rng_must_be_explicit():
    with pytest.raises(ConfigError):
        make_scene(None)  # type: ignore[arg-type]


# ---- prompts -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("red triangles", ("red", "triangle")),
        ("red triangle", ("red", "triangle")),
        ("  Red   Triangles. ", ("red", "triangle")),
        ("the blue crosses", ("blue", "cross")),
        ("crosses", (None, "cross")),
        ("cross", (None, "cross")),
        ("a hexagon", (None, "hexagon")),
        ("purple stars", ("purple", "star")),
    ],
)
def test_parse_prompt(text, expected):
    assert parse_prompt(text) == expected


@pytest.mark.parametrize("text", ["", "purple", "blue dogs", "red blue circles", "circles red", "crosss"])
def test_parse_prompt_rejects_other_text(text):
    with pytest.raises(PromptError, match="cannot read the prompt"):
        parse_prompt(text)


def test_count_for_prompt():
    classes = {("red", "circle"): 5, ("blue", "circle"): 7, ("red", "star"): 3}
    scene = make_scene(1, WorldConfig(max_width=800), classes)
    assert scene.class_counts() == classes  # nothing culled in a sparse scene
    assert count_for_prompt(scene, "red circles") == 5
    assert scene.count("red circle") == 5
    assert scene.count("circles") == 12
    assert scene.count("star") == 3
    assert scene.count("green stars") == 0
    assert len(scene.points("red")) == 8


def test_training_prompts_use_every_wording():
    prompts = [sample_training_example(s, SMALL)[1] for s in range(60)]
    forms = {(parse_prompt(p)[0] is None, p.endswith("s") and not p.endswith("ss")) for p in prompts}
    assert len(forms) == 4  # with and without colour, plural and singular


# ---- captions ----------------------------------------------------------------------------------

def test_caption_names_every_class():
    rng = np.random.default_rng(0)
    scene = make_scene(0, SMALL, {("red", "circle"): 1, ("green", "star"): 3, ("blue", "square"): 40})
    for _ in range(5):
        caption = caption_for(scene, rng)
        assert "red circle" in caption and "green star" in caption and "blue square" in caption


def test_all_class_prompts():
    train, full = all_class_prompts(False), all_class_prompts(True)
    assert len(train) == 30 and len(full) == 36
    assert "red squares" in full and "red squares" not in train and "red crosses" in train


# ---- FSC-147 files -----------------------------------------------------------------------------

def read_dataset(root: Path):
    annotations = json.loads((root / ANNOTATIONS).read_text())
    splits = json.loads((root / SPLIT_FILE).read_text())
    classes = dict(line.split("\t") for line in (root / CLASS_FILE).read_text().splitlines())
    return annotations, splits, classes


def test_make_dataset_writes_fsc147_files(tmp_path):
    cfg = WorldConfig(max_width=500, max_per_class=40)
    written = make_dataset(tmp_path, "train", 5, seed=3, cfg=cfg, progress=False)
    annotations, splits, classes = read_dataset(tmp_path)
    assert set(splits) >= {"train", "val", "test", "val_coco", "test_coco"}
    assert splits["train"] == written.files and len(written.files) == 5
    for i, name in enumerate(written.files):
        entry = annotations[name]
        with Image.open(tmp_path / IMAGE_DIR / name) as im:
            assert im.format == "JPEG" and im.size == (entry["W"], entry["H"]) and entry["H"] == 384
        assert entry["ratio_h"] == entry["ratio_w"] == 1.0
        boxes = entry["box_examples_coordinates"]
        assert len(boxes) == 3
        for (x1, y1), (x1b, y2), (x2, y2b), (x2b, y1b) in boxes:
            assert x1 == x1b and x2 == x2b and y1 == y1b and y2 == y2b and x1 < x2 and y1 < y2
        # The points are those of the prompted class in the regenerated scene.
        scene, prompt = example_for(image_rng(3, i, "train"), "train", cfg)
        assert classes[name] == prompt
        assert len(entry["points"]) == scene.count(prompt) == written.counts[i] >= 1
        pts = np.array(entry["points"])
        assert (pts >= 0).all() and (pts[:, 0] <= entry["W"]).all() and (pts[:, 1] <= entry["H"]).all()
        assert parse_prompt(prompt) not in HELD_OUT


def test_make_dataset_merges_splits_and_replaces_a_rewritten_split(tmp_path):
    cfg = WorldConfig(max_width=400, max_per_class=20)
    make_dataset(tmp_path, "train", 4, seed=0, cfg=cfg, progress=False)
    make_dataset(tmp_path, "test", 3, seed=1, mode="test", cfg=cfg, progress=False)
    annotations, splits, classes = read_dataset(tmp_path)
    assert len(splits["train"]) == 4 and len(splits["test"]) == 3
    assert set(annotations) == set(classes) == set(splits["train"]) | set(splits["test"])
    kinds = [annotations[n]["synthetic"]["kind"] for n in splits["test"]]
    assert kinds == ["held_out", "fidelity", "seen"]

    make_dataset(tmp_path, "train", 2, seed=5, cfg=cfg, progress=False)
    annotations, splits, classes = read_dataset(tmp_path)
    assert len(splits["train"]) == 2 and len(splits["test"]) == 3
    assert set(annotations) == set(classes) == set(splits["train"]) | set(splits["test"])
    assert sorted(p.name for p in (tmp_path / IMAGE_DIR).iterdir()) == sorted(annotations)
    assert not list(tmp_path.glob(".*.tmp"))
    assert {p.name for p in tmp_path.iterdir()} == {ANNOTATIONS, SPLIT_FILE, CLASS_FILE, IMAGE_DIR, ".synthetic.lock"}


def test_make_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        make_dataset(tmp_path, "../evil", 1, 0)
    with pytest.raises(ConfigError):
        make_dataset(tmp_path, "train", 1, 0, mode="train", kind="held_out")
    with pytest.raises(ConfigError):
        make_dataset(tmp_path, "test", 1, 0, mode="eval")


@pytest.mark.slow
def test_make_dataset_is_the_same_with_workers(tmp_path):
    cfg = WorldConfig(max_width=400, max_per_class=20)
    one = make_dataset(tmp_path / "a", "val", 4, seed=2, cfg=cfg, progress=False)
    two = make_dataset(tmp_path / "b", "val", 4, seed=2, cfg=cfg, workers=2, progress=False)
    assert one.files == two.files and one.counts == two.counts
    assert read_dataset(tmp_path / "a")[0] == read_dataset(tmp_path / "b")[0]
    for name in one.files:
        assert (tmp_path / "a" / IMAGE_DIR / name).read_bytes() == (tmp_path / "b" / IMAGE_DIR / name).read_bytes()


def test_fsc147_reader_loads_the_dataset(tmp_path):
    fsc147 = pytest.importorskip("clipcount.data.fsc147")
    cfg = WorldConfig(max_width=450, max_per_class=30)
    written = make_dataset(tmp_path, "val", 3, seed=4, mode="test", kind="fidelity", cfg=cfg, progress=False)
    data = fsc147.FSC147(tmp_path, "val")
    assert len(data) == 3
    for i in range(3):
        sample = data[i]
        assert sample.count == written.counts[i]
        assert parse_prompt(sample.prompt) is not None
        assert sample.image.shape[0] == 384 and sample.boxes.shape == (3, 4)


def test_cli_make_dataset(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="clipcount")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["synthetic", "make-dataset", str(tmp_path), "--split", "test", "--n", "2", "--seed", "1",
         "--mode", "test", "--kind", "held_out", "--max-width", "420", "--quiet"]
    )
    assert args.func(args) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    annotations, splits, classes = read_dataset(tmp_path)
    assert len(splits["test"]) == 2
    assert all(parse_prompt(classes[n]) in HELD_OUT for n in splits["test"])


def test_world_config_validation():
    with pytest.raises(ConfigError, match="min_size"):
        WorldConfig(min_size=20, max_size=10)
    with pytest.raises(ConfigError, match="mode"):
        WorldConfig(mode="eval")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="classes_per_scene"):
        WorldConfig(classes_per_scene=(0, 3))
    assert WorldConfig(classes_per_scene=[2, 3]).classes_per_scene == (2, 3)
