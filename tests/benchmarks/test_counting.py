"""benchmarks/counting.py: every row and column on a tiny random model, baselines computed as
documented, training seeds refused, and the command line writing its JSON.

(No __init__.py in this folder on purpose: with one, pytest would put tests/ on sys.path and
`import benchmarks` would find this folder instead of the repository's benchmarks package.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import counting
from benchmarks.counting import COLUMNS, ROWS, BenchScene, run_benchmark, score
from clipcount.config import tiny_config
from clipcount.errors import ConfigError
from clipcount.modeling.checkpoint import save_model
from clipcount.modeling.clip_count import ClipCount
from clipcount.synthetic.world import WorldConfig

# 128-pixel-high test scenes keep the benchmark quick on a tiny model (64-pixel windows).
WORLD = WorldConfig(height=128, min_width=128, max_width=256, min_size=5.0, max_size=20.0, max_per_class=60)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    main = save_model(ClipCount(tiny_config()), root / "main",
                      extra={"synthetic": {"train_mean_count": 12.5, "train_seeds": [0, 123]}})
    other = save_model(ClipCount(tiny_config()), root / "no_visual_prompts")
    return main, other


def test_every_row_and_column_for_the_model_and_ablations(checkpoints, tmp_path):
    main, other = checkpoints
    out = tmp_path / "results.json"
    payload = run_benchmark({"main": main, "no_visual_prompts": other}, seed=77, n=2, world=WORLD,
                            device="cpu", out=out, progress=False)
    saved = json.loads(out.read_text())
    assert saved["train_mean"] == 12.5 and saved["train_mean_source"] == "checkpoint config"
    for label in ("main", "no_visual_prompts"):
        results = saved["results"][label]
        assert set(ROWS) <= set(results)
        for row in ROWS:
            assert results[row]["n"] == 2
            for key in ("model", "mean", "agnostic"):
                assert {"mae", "rmse", "nae"} <= set(results[row][key])
    assert len(saved["table"]) == 2 * len(ROWS)
    assert all(set(COLUMNS) == set(line) for line in saved["table"])
    assert {line["row"] for line in saved["table"]} == set(counting.ROW_TITLES.values())
    assert payload["per_image"]["truth"]["fidelity"] == saved["per_image"]["truth"]["fidelity"]


def test_rows_ask_the_documented_questions():
    seen = counting.make_test_scene(5, "seen", 0, WORLD)
    assert set(seen.prompts) == {"seen", "shape_only", "singular"}
    colour, plural = seen.prompts["seen"].split()
    assert seen.prompts["shape_only"] == plural and seen.prompts["singular"].startswith(colour + " ")
    assert seen.truths["shape_only"] >= seen.truths["seen"] == seen.truths["singular"] >= 1
    held = counting.make_test_scene(5, "held_out", 0, WORLD)
    from clipcount.synthetic.prompts import HELD_OUT, parse_prompt

    assert parse_prompt(held.prompts["held_out"]) in HELD_OUT
    fidelity = counting.make_test_scene(5, "fidelity", 0, WORLD)
    assert fidelity.truths["fidelity"] <= 15 < fidelity.total
    # the same seed gives the same scene; another seed does not
    again = counting.make_test_scene(5, "seen", 0, WORLD)
    assert np.array_equal(seen.image, again.image)
    assert not np.array_equal(seen.image, counting.make_test_scene(6, "seen", 0, WORLD).image)


def test_baselines_are_the_training_mean_and_the_total():
    image = np.zeros((4, 4, 3), np.uint8)
    scenes = [
        BenchScene("held_out", 0, image, {"held_out": "green triangles"}, {"held_out": 4}, 10),
        BenchScene("held_out", 1, image, {"held_out": "green triangles"}, {"held_out": 8}, 8),
    ]
    result = score(scenes, {row: [5.0, 8.0] if row == "held_out" else [] for row in ROWS}, train_mean=6.0)
    assert set(result) == {"held_out"}
    held = result["held_out"]
    assert held["model"]["mae"] == pytest.approx(0.5)
    assert held["mean"]["mae"] == pytest.approx(2.0)  # |6 - 4|, |6 - 8|
    assert held["agnostic"]["mae"] == pytest.approx(3.0)  # |10 - 4|, |8 - 8|
    assert held["model"]["nae"] == pytest.approx(0.5 / 6.0)


def test_a_training_seed_is_refused(checkpoints):
    with pytest.raises(ConfigError, match="training seed"):
        run_benchmark({"main": checkpoints[0]}, seed=123, n=1, world=WORLD, device="cpu", progress=False)


def test_targets_are_checked():
    results = {"held_out": {"model": {"nae": 0.09}, "mean": {"nae": 0.5}},
               "seen": {"model": {"nae": 0.08}, "mean": {"nae": 0.6}},
               "fidelity": {"model": {"nae": 0.1}, "mean": {"nae": 0.3}}}
    checks = counting.nae_targets(results)
    assert checks["held_out"]["met"] and not checks["seen"]["met"] and not checks["fidelity"]["met"]


def test_command_line(checkpoints, tmp_path, capsys):
    main, other = checkpoints
    out = tmp_path / "cli.json"
    code = counting.main(["--model", str(main), "--ablations", str(other), "--n", "1", "--seed", "99",
                          "--train-mean", "3", "--device", "cpu", "--out", str(out), "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out classes (zero-shot)" in text and "targets:" in text
    assert set(json.loads(out.read_text())["results"]) == {"main", "no_visual_prompts"}
    assert counting.main(["--model", str(main), "--seed", "123", "--n", "1", "--quiet"]) == 2
