"""Fine-tuning on your own images: the folder dataset's splits, `train --init` with model names,
fine-tuning defaults, and the evaluation hint that works as printed."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcount.cli import main
from clipcount.data import FolderDataset, build_dataset
from clipcount.data.folder import held_out_split
from clipcount.errors import DataError


def _images(folder: Path, names: list[str], size: tuple[int, int] = (80, 64)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)


def _points_csv(path: Path, names: list[str], splits: list[str] | None = None) -> Path:
    header = "image,class,x,y" + (",split" if splits else "")
    lines = [header]
    for i, name in enumerate(names):
        for k in range(i + 1):  # image i holds i + 1 dots
            lines.append(f"{name},dots,{5 + 6 * k},{10 + k}" + (f",{splits[i]}" if splits else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the folder dataset's splits -----------------------------------------------------------------

def test_a_split_column_picks_the_images(tmp_path):
    names = [f"{i}.png" for i in range(4)]
    _images(tmp_path, names)
    points = _points_csv(tmp_path / "points.csv", names, ["train", "train", "val", "test"])
    assert FolderDataset(tmp_path, points, split="train").names == ["0.png", "1.png"]
    assert build_dataset("folder", tmp_path, "val", annotations=points).names == ["2.png"]
    assert FolderDataset(tmp_path, points, split="test").counts == [4]
    assert len(FolderDataset(tmp_path, points, split="all")) == len(FolderDataset(tmp_path, points)) == 4


def test_without_split_labels_a_fixed_part_is_held_out(tmp_path):
    names = [f"img{i}.png" for i in range(10)]
    _images(tmp_path, names)
    _points_csv(tmp_path / "annotations.csv", names)
    train = FolderDataset(tmp_path, split="train").names
    test = FolderDataset(tmp_path, split="test").names
    assert len(test) == 2 and not set(train) & set(test) and set(train) | set(test) == set(names)
    assert FolderDataset(tmp_path, split="val").names == test  # no val labels: the held-out part
    assert held_out_split(["a.png"]) == {"a.png": "train"}  # one image: nothing to hold out
    assert list(held_out_split(["a.png", "b.png"]).values()).count("test") == 1


def test_split_labels_in_json_and_their_errors(tmp_path):
    _images(tmp_path, ["a.png", "b.png"])
    points = tmp_path / "p.json"
    points.write_text(json.dumps({"a.png": [{"class": "dots", "points": [[1, 1]], "split": "test"}],
                                  "b.png": [{"class": "dots", "points": [], "split": "train"}]}))
    assert FolderDataset(tmp_path, points, split="test").names == ["a.png"]
    points.write_text(json.dumps({"a.png": [{"class": "dots", "points": [], "split": "testing"}]}))
    with pytest.raises(DataError, match="'testing' is not one of train, val, test"):
        FolderDataset(tmp_path, points)
    points.write_text(json.dumps({"a.png": [{"class": "dots", "points": [], "split": "test"}],
                                  "b.png": [{"class": "dots", "points": []}]}))
    with pytest.raises(DataError, match="label every image or none"):
        FolderDataset(tmp_path, points)
    points.write_text(json.dumps({"a.png": [{"class": "dots", "points": [], "split": "train"}]}))
    with pytest.raises(DataError, match="no image is in split 'test'"):
        FolderDataset(tmp_path, points, split="test")


def test_errors_name_the_flags_not_python_arguments(tmp_path):
    _images(tmp_path, ["a.png"])
    with pytest.raises(DataError, match="--annotations") as missing:
        FolderDataset(tmp_path)
    assert "annotations=" not in str(missing.value)
    (tmp_path / "annotations.csv").write_text("image,class,x,y\na.png,dots,500,1\n")
    with pytest.raises(DataError, match="--skip-bad"):
        FolderDataset(tmp_path)


# ---- clipcount train --init -----------------------------------------------------------------------

def test_init_takes_model_names_like_model(tmp_path):
    from clipcount.cli.train import make_model

    args = argparse.Namespace(init="demo", resume=False, out=str(tmp_path / "run"), tiny=False, clip=None)
    assert make_model(args, {}).config.resize_height == 384  # the bundled demo model, by name


def test_help_says_which_defaults_fine_tuning_uses(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--contrastive-epochs 0" in text and "--density-epochs 200" in text and "--init" in text
    assert "--background-share 0.25" in text and "--lr 0.001" in text


def test_fine_tune_on_a_folder_and_evaluate_as_the_hint_says(tiny_checkpoint, tmp_path, capsys):
    names = [f"{i}.png" for i in range(5)]
    data = tmp_path / "mine"
    _images(data, names)
    points = _points_csv(tmp_path / "my points.csv", names, ["train", "train", "train", "test", "test"])
    run = tmp_path / "run"
    code = main(["train", "--dataset", "folder", "--root", str(data), "--annotations", str(points), "--init",
                 str(tiny_checkpoint), "--out", str(run), "--max-steps", "2", "--batch-size", "2", "--workers", "0",
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    hint = next(line for line in printed.splitlines() if line.startswith("evaluate it: ")).split(": ", 1)[1]
    assert "--annotations" in hint and "--split test" in hint
    config = json.loads((run / "final" / "config.json").read_text())
    used = config["training"]["train_config"]
    assert used["contrastive_epochs"] == 0 and used["density_epochs"] == 200  # fine-tuning defaults
    assert config["clipcount"]["decoder"]["activation"] == "identity"  # a fresh linear output layer
    words = shlex.split(hint)
    assert words[:2] == ["clipcount", "eval"]
    assert main(words[1:] + ["--no-progress"]) == 0  # works as printed
    assert "folder (2 images)" in capsys.readouterr().out
