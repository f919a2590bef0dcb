"""Every experiment end to end at the toy budget (shared cache: one CLIP, shared variants), the
command line, FSC-147 mode on a tiny FSC-147-format fixture, and the helpers' arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipcount.errors import ConfigError
from clipcount.experiments import EXPERIMENTS, run_experiment

TOY_WORLD = dict(height=64, min_width=64, max_width=128, min_size=5.0, max_size=14.0, max_per_class=20)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the CLIP is pretrained once and shared variants train once."""
    return tmp_path_factory.mktemp("experiments-cache")


def check_outputs(report: Path, name: str) -> dict:
    out = report.parent
    assert report.name == "report.md" and report.is_file()
    text = report.read_text(encoding="utf-8")
    assert "## Seeds and configuration" in text and "test scenes 10000000" in text
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["experiment"] == name
    assert results["run"]["seed"] == 0 and results["run"]["budget"]["name"] == "toy"
    assert results["tables"] and all(t["rows"] for t in results["tables"])
    assert results["findings"]
    assert results["plots"]
    for plot in results["plots"]:
        assert (out / plot).is_file() and (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({plot})" in text
    return results


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_experiment_runs_at_the_toy_budget(name: str, tmp_path: Path, cache: Path) -> None:
    report = run_experiment(name, tmp_path / name, budget="toy", cache=cache, progress=False)
    results = check_outputs(report, name)
    if name in ("contrastive", "scales", "tuning"):
        assert results["variants"]  # every trained arm records its configuration and training facts
        assert all("model_config" in v for v in results["variants"].values())


def test_the_command_line_runs_an_experiment(tmp_path: Path, cache: Path, capsys) -> None:
    from clipcount.cli import main

    out = tmp_path / "spec"
    code = main(["experiments", "specificity", "--out", str(out), "--budget", "toy", "--cache", str(cache),
                 "--no-progress"])
    assert code == 0
    results = check_outputs(out / "report.md", "specificity")
    assert results["run"]["command"].startswith("clipcount")
    assert results["variants"]["paper"]["cached"]  # trained by an earlier test, reused from the cache
    assert "report:" in capsys.readouterr().out


def test_help_lists_every_experiment(capsys) -> None:
    from clipcount.cli import main

    with pytest.raises(SystemExit):
        main(["experiments", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in EXPERIMENTS)


def test_fsc147_mode_on_a_tiny_fixture(tmp_path: Path, cache: Path) -> None:
    from clipcount.synthetic.dataset import make_dataset
    from clipcount.synthetic.world import WorldConfig

    root = tmp_path / "FSC147"
    world = WorldConfig(**TOY_WORLD)
    make_dataset(root, "train", 4, seed=1, mode="train", cfg=world, progress=False)
    make_dataset(root, "val", 2, seed=2, mode="test", cfg=world, progress=False)
    make_dataset(root, "test", 3, seed=3, mode="test", cfg=world, progress=False)
    for name in ("contrastive", "generalisation"):
        report = run_experiment(name, tmp_path / name, budget="toy", data="fsc147", root=root, cache=cache,
                                progress=False)
        results = check_outputs(report, name)
        assert results["run"]["data"] == "fsc147"
    assert "FSC-147" in (tmp_path / "generalisation" / "report.md").read_text(encoding="utf-8")


def test_people_get_clear_errors(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ConfigError, match="unknown experiment"):
        run_experiment("nope", tmp_path / "x", budget="toy", cache=cache)
    with pytest.raises(ConfigError, match="--root"):
        run_experiment("cost", tmp_path / "x", budget="toy", data="fsc147", cache=cache)
    with pytest.raises(ConfigError, match="--model"):
        run_experiment("tuning", tmp_path / "x", budget="toy", model=tmp_path, cache=cache, progress=False)
    with pytest.raises(ConfigError, match="budget"):
        run_experiment("cost", tmp_path / "x", budget="huge", cache=cache)


def test_roc_auc_and_changes() -> None:
    from clipcount.config import ClipCountConfig
    from clipcount.experiments.scenes import roc_auc
    from clipcount.experiments.training import apply_changes

    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    changed = apply_changes(ClipCountConfig(), {"interaction.scales": 3, "train_image_encoder": True})
    assert changed.interaction.scales == 3 and changed.train_image_encoder
    with pytest.raises(ConfigError, match="unknown model setting"):
        apply_changes(ClipCountConfig(), {"interaction.scale": 3})


def test_plots_cover_their_values(tmp_path: Path) -> None:
    from PIL import Image

    from clipcount.experiments import plots

    assert plots.nice_ticks(0, 65.5)[-1] >= 65.5
    assert plots.nice_ticks(0.1, 0.37)[0] <= 0.1
    path = plots.xy_chart(tmp_path / "a.png", {"s": ([1, 10, 100], [0.5, float("nan"), 0.2])}, "t", "x", "y",
                          log_x=True)
    assert Image.open(path).size == (plots.WIDTH, plots.HEIGHT)
    grid = plots.map_grid(tmp_path / "b.png", [[("img", np.zeros((8, 8, 3), np.uint8)), ("map", np.eye(4))]], "t")
    assert grid.is_file()
