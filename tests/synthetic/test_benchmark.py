"""clipcount.synthetic.benchmark: every row asks its documented question, baselines are computed as
documented, true-0 rows are scored by the mean predicted count, training seeds are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipcount.config import tiny_config
from clipcount.errors import ConfigError
from clipcount.modeling.checkpoint import save_model
from clipcount.modeling.clip_count import ClipCount
from clipcount.synthetic import benchmark
from clipcount.synthetic.benchmark import COLUMNS, ROWS, BenchScene, check_targets, run_benchmark, score
from clipcount.synthetic.prompts import HELD_OUT, TRAIN_CLASSES, differs_in_one_attribute, parse_prompt
from clipcount.synthetic.world import WorldConfig

# 128-pixel-high test scenes keep the benchmark quick on a tiny model (64-pixel windows).
WORLD = WorldConfig(mode="test", height=128, min_width=128, max_width=256, min_size=5.0, max_size=20.0,
                    max_per_class=60, classes_per_scene=(2, 4))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    main = save_model(ClipCount(tiny_config()), root / "main",
                      extra={"synthetic": {"train_mean_count": 12.5, "train_seeds": [0, 123]}})
    other = save_model(ClipCount(tiny_config()), root / "single_prompt")
    return main, other


def test_every_row_and_column_for_the_model_and_ablations(checkpoints, tmp_path):
    main, other = checkpoints
    out = tmp_path / "results.json"
    run_benchmark({"main": main, "single_prompt": other}, seed=77, n=2, world=WORLD, device="cpu", out=out,
                  progress=False)
    saved = json.loads(out.read_text())
    assert saved["train_mean"] == 12.5 and saved["train_mean_source"] == "checkpoint config"
    for label in ("main", "single_prompt"):
        results = saved["results"][label]
        for row in ROWS:
            assert results[row]["n"] == 2
            for key in ("model", "mean", "agnostic", "shape_blind", "colour_blind"):
                assert {"mae", "rmse", "nae", "bias", "pred_mean"} <= set(results[row][key])
    assert len(saved["table"]) == 2 * len(ROWS)
    assert all(set(COLUMNS) == set(line) for line in saved["table"])
    assert set(saved["targets"]) == {"seen", "held_out", "minority", "shape_only", "absent", "blank"}


def test_rows_ask_the_documented_questions():
    seen = benchmark.make_test_scene(5, "seen", 0, WORLD)
    assert set(seen.prompts) == {"seen", "shape_only", "singular", "template", "absent"}
    colour, shape = parse_prompt(seen.prompts["seen"])
    assert (colour, shape) in TRAIN_CLASSES
    assert parse_prompt(seen.prompts["shape_only"]) == (None, shape)
    assert parse_prompt(seen.prompts["singular"]) == (colour, shape) and not seen.prompts["singular"].endswith("s")
    assert seen.prompts["seen"] in seen.prompts["template"] and seen.prompts["template"] != seen.prompts["seen"]
    assert seen.truths["shape_only"] >= seen.truths["seen"] == seen.truths["singular"] == seen.truths["template"] >= 1
    assert seen.truths["absent"] == 0
    assert parse_prompt(seen.prompts["absent"]) in TRAIN_CLASSES
    for i in range(12):  # the 2-4 classes of a seen scene; the absent class is one attribute off when possible
        scene = benchmark.make_test_scene(5, "seen", i, WORLD)
        absent = parse_prompt(scene.prompts["absent"])
        assert scene.truths["absent"] == 0 and scene.total > scene.truths["seen"]
        assert any(differs_in_one_attribute(absent, c) for c in TRAIN_CLASSES if c != absent)
    held = benchmark.make_test_scene(5, "held_out", 0, WORLD)
    assert parse_prompt(held.prompts["held_out"]) in HELD_OUT
    for i in range(6):
        minority = benchmark.make_test_scene(5, "minority", i, WORLD)
        assert 1 <= minority.truths["minority"] <= 12 and minority.total >= minority.truths["minority"] + 16
    blank = benchmark.make_test_scene(5, "blank", 0, WORLD)
    assert blank.truths == {"blank": 0} and blank.total == 0 and blank.image.shape[0] == 128
    again = benchmark.make_test_scene(5, "seen", 0, WORLD)
    assert np.array_equal(seen.image, again.image)
    assert not np.array_equal(seen.image, benchmark.make_test_scene(6, "seen", 0, WORLD).image)


def test_blind_counters_read_one_word_of_the_prompt():
    for i in range(8):
        scene = benchmark.make_test_scene(5, "seen", i, WORLD)
        colour, shape = parse_prompt(scene.prompts["seen"])
        absent_colour, absent_shape = parse_prompt(scene.prompts["absent"])
        assert scene.shape_blind["seen"] >= scene.truths["seen"] and scene.colour_blind["seen"] >= scene.truths["seen"]
        assert scene.shape_blind["shape_only"] == scene.total  # no colour named: every object
        assert scene.colour_blind["shape_only"] == scene.truths["shape_only"]
        assert scene.colour_blind["seen"] == scene.truths["shape_only"]  # every object of the shape
        assert scene.shape_blind["singular"] == scene.shape_blind["template"] == scene.shape_blind["seen"]
        assert (absent_colour, absent_shape) != (colour, shape)
    minority = benchmark.make_test_scene(5, "minority", 0, WORLD)
    assert minority.shape_blind["minority"] >= minority.truths["minority"]
    blank = benchmark.make_test_scene(5, "blank", 0, WORLD)
    assert blank.shape_blind == blank.colour_blind == {"blank": 0}


def test_blind_baselines_are_scored():
    image = np.zeros((4, 4, 3), np.uint8)
    scenes = [BenchScene("seen", 0, image, {"seen": "red stars"}, {"seen": 4}, 12, {"seen": 10}, {"seen": 6}),
              BenchScene("seen", 1, image, {"seen": "red stars"}, {"seen": 2}, 5)]  # no blind answers: the truth
    preds = {row: [] for row in ROWS}
    preds["seen"] = [4.0, 2.0]
    result = score(scenes, preds, train_mean=6.0)["seen"]
    assert result["shape_blind"]["mae"] == pytest.approx(3.0)  # |10 - 4|, |2 - 2|
    assert result["colour_blind"]["mae"] == pytest.approx(1.0)  # |6 - 4|, |2 - 2|


def test_baselines_are_the_training_mean_and_the_total():
    image = np.zeros((4, 4, 3), np.uint8)
    scenes = [
        BenchScene("held_out", 0, image, {"held_out": "green triangles"}, {"held_out": 4}, 10),
        BenchScene("held_out", 1, image, {"held_out": "green triangles"}, {"held_out": 8}, 8),
        BenchScene("blank", 0, image, {"blank": "red stars"}, {"blank": 0}, 0),
    ]
    preds = {row: [] for row in ROWS}
    preds.update(held_out=[5.0, 8.0], blank=[0.25])
    result = score(scenes, preds, train_mean=6.0)
    assert set(result) == {"held_out", "blank"}
    held = result["held_out"]
    assert held["model"]["mae"] == pytest.approx(0.5)
    assert held["mean"]["mae"] == pytest.approx(2.0)  # |6 - 4|, |6 - 8|
    assert held["agnostic"]["mae"] == pytest.approx(3.0)  # |10 - 4|, |8 - 8|
    assert held["model"]["nae"] == pytest.approx(0.5 / 6.0) and held["model"]["bias"] == pytest.approx(0.5)
    assert result["blank"]["model"]["pred_mean"] == 0.25 and result["blank"]["mean"]["pred_mean"] == 6.0


def test_targets_are_checked():
    def row(nae, base, pred=1.0, base_pred=6.0):
        return {"model": {"nae": nae, "pred_mean": pred}, "mean": {"nae": base, "pred_mean": base_pred}}

    results = {"held_out": row(0.19, 0.9), "seen": row(0.08, 0.3), "minority": row(0.25, 2.0),
               "absent": row(float("nan"), float("nan"), 0.4), "blank": row(float("nan"), float("nan"), 0.6)}
    checks = check_targets(results)
    assert checks["held_out"]["met"] and not checks["seen"]["met"] and not checks["minority"]["met"]
    assert checks["absent"]["met"] and not checks["blank"]["met"]
    assert "shape_only" not in checks


def test_a_training_seed_is_refused(checkpoints):
    with pytest.raises(ConfigError, match="training seed"):
        run_benchmark({"main": checkpoints[0]}, seed=123, n=1, world=WORLD, device="cpu", progress=False)
