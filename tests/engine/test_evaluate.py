"""Dataset evaluation: metrics on a hand-checked case, results files, published scores beside ours,
ShanghaiTech's landscape rule, bad images, and `clipcount eval` on every dataset kind."""

from __future__ import annotations

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch

from clipcount.cli import main
from clipcount.config import tiny_config
from clipcount.data import CountingSample, build_dataset
from clipcount.engine.evaluate import PUBLISHED, evaluate
from clipcount.engine.inference import DensityPredictor
from clipcount.errors import DataError
from clipcount.modeling.checkpoint import save_model
from clipcount.modeling.clip_count import ClipCount

from .fixtures import write_carpk, write_fsc147, write_fsc147_s, write_shanghaitech


class ReadsTheCount:
    """A stand-in predictor: the image's mean brightness x 10 is its count, spread evenly as density.
    It records the shapes it was given."""

    window = 64
    stride = 32
    density_scale = 60.0

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []

    def predict(self, image: torch.Tensor, prompts: list[str]) -> list[torch.Tensor]:
        self.shapes.append(tuple(image.shape))
        count = float(image.mean()) * 10
        density = torch.full((self.window, 96), count * self.density_scale / (self.window * 96))
        return [density for _ in prompts]

    def count(self, density: torch.Tensor) -> float:
        return float(density.sum()) / self.density_scale


def sample(name: str, prompt: str, true_count: int, predicted: float, height: int = 32, width: int = 48) -> CountingSample:
    """An image that makes ReadsTheCount predict `predicted`, annotated with `true_count` points."""
    image = np.full((height, width, 3), predicted / 10, dtype=np.float32)
    points = np.tile([[1.0, 1.0]], (true_count, 1))
    return CountingSample(image=image, points=points, prompt=prompt, name=name)


class ListDataset(list):
    dataset_name = "toy"


def test_metrics_on_a_hand_checked_case(tmp_path):
    dataset = ListDataset([sample("a.jpg", "apples", 2, 3.0), sample("b.jpg", "apples", 4, 2.0),
                           sample("c.jpg", "cars", 5, 5.0)])
    report = evaluate(None, dataset, out_dir=tmp_path, progress=False, predictor=ReadsTheCount())
    # errors +1, -2, 0 against counts 2, 4, 5
    assert report.overall.n == 3
    assert report.overall.mae == pytest.approx(1.0)
    assert report.overall.rmse == pytest.approx(math.sqrt(5 / 3))
    assert report.overall.nae == pytest.approx(3 / 11)
    assert report.overall.sre == pytest.approx(math.sqrt(5 / 45))
    assert report.per_class["apples"].mae == pytest.approx(1.5) and report.per_class["cars"].mae == pytest.approx(0.0)
    assert report.published == {}  # nothing published for a toy dataset
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [(r["image"], r["prompt"], r["gt"]) for r in rows] == [("a.jpg", "apples", "2"), ("b.jpg", "apples", "4"),
                                                                  ("c.jpg", "cars", "5")]
    assert float(rows[0]["predicted"]) == pytest.approx(3.0, abs=1e-3)
    assert float(rows[1]["error"]) == pytest.approx(-2.0, abs=1e-3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overall"]["mae"] == pytest.approx(1.0) and summary["per_class"]["cars"]["n"] == 1
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files


def test_fsc147_s_reports_the_published_scores_beside_ours(tmp_path):
    fsc = write_fsc147(tmp_path / "FSC147", {"train": 2})
    write_fsc147_s(fsc, {"1.jpg": ("cars", 0), "2.jpg": ("apples", 3)})
    report = evaluate(None, build_dataset("fsc147-s", fsc), progress=False, predictor=ReadsTheCount())
    assert report.published == PUBLISHED["fsc147-s"]
    assert report.published["CLIP-Count"] == (45.59, 98.96) and report.published["T2ICount"] == (5.99, 10.55)
    table = report.table()
    assert "published: T2ICount" in table and "45.59" in table and "this model" in table
    assert [row.gt for row in report.rows] == [0, 3]


def test_shanghaitech_images_are_turned_to_landscape(tmp_path):
    root = write_shanghaitech(tmp_path / "ShanghaiTech", "B", {"IMG_1": (40, 60, 2), "IMG_2": (60, 40, 1)})
    predictor = ReadsTheCount()
    report = evaluate(None, build_dataset("shanghaitech-b", root), progress=False, predictor=predictor)
    assert predictor.shapes == [(3, 40, 60), (3, 40, 60)]
    assert report.dataset == "ShanghaiTech-B test" and report.published["CLIP-Count"] == (47.92, 80.48)


class OneBadImage(ListDataset):
    names = ["a.jpg", "broken.jpg"]

    def __getitem__(self, index):
        if index == 1:
            raise DataError("cannot read image broken.jpg (truncated); replace or remove the file")
        return super().__getitem__(index)


def test_a_bad_image_stops_evaluation_unless_skipped(tmp_path):
    dataset = OneBadImage([sample("a.jpg", "apples", 2, 2.0), None])
    with pytest.raises(DataError, match="broken.jpg"):
        evaluate(None, dataset, progress=False, predictor=ReadsTheCount())
    with pytest.warns(UserWarning, match="broken.jpg"):
        report = evaluate(None, dataset, out_dir=tmp_path, progress=False, predictor=ReadsTheCount(), skip_bad=True)
    assert report.overall.n == 1 and report.skipped[0][0] == "broken.jpg"
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"][0]["image"] == "broken.jpg"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = ClipCount(tiny_config())
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny")


def test_evaluate_with_the_real_predictor_matches_counting_by_hand(tiny_checkpoint, tmp_path):
    from clipcount.modeling.checkpoint import load_model

    fsc = write_fsc147(tmp_path / "FSC147", {"train": 0, "val": 2})
    dataset = build_dataset("fsc147", fsc, "val")
    model = load_model(tiny_checkpoint)
    report = evaluate(model, dataset, stride=32, progress=False, device="cpu")
    predictor = DensityPredictor(model, stride=32, device="cpu")
    for row, index in zip(report.rows, range(len(dataset))):
        item = dataset[index]
        image = torch.from_numpy(item.image.transpose(2, 0, 1).copy())
        assert row.predicted == pytest.approx(predictor.count(predictor.predict(image, [item.prompt])[0]), rel=1e-5)
        assert row.gt == item.count
    assert report.stride == 32 and report.window == 64


def test_stride_defaults_to_a_third_of_the_window(tiny_checkpoint, tmp_path):
    from clipcount.modeling.checkpoint import load_model

    fsc = write_fsc147(tmp_path / "FSC147", {"train": 0, "val": 1})
    report = evaluate(load_model(tiny_checkpoint), build_dataset("fsc147", fsc, "val"), progress=False, device="cpu")
    assert report.stride == 21


@pytest.mark.parametrize(
    ("name", "extra", "published"),
    [
        ("fsc147", ["--split", "val"], (18.93, 66.10)),
        ("fsc147-s", ["--subset", "{root}/subset.json"], (45.59, 98.96)),
        ("carpk", [], (11.70, 13.94)),
        ("shanghaitech", ["--part", "A"], (197.47, 319.75)),
    ],
)
def test_clipcount_eval_runs_each_dataset_in_one_command(tiny_checkpoint, tmp_path, capsys, name, extra, published):
    if name.startswith("fsc147"):
        root = write_fsc147(tmp_path / "data", {"train": 2, "val": 2})
        (root / "subset.json").write_text(json.dumps({"1.jpg": {"class": "cars", "count": 1}}))
    elif name == "carpk":
        root = write_carpk(tmp_path / "data")
    else:
        root = write_shanghaitech(tmp_path / "data", "A")
    args = ["eval", "--model", str(tiny_checkpoint), "--dataset", name, "--root", str(root), "--stride", "32",
            "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main(args + [a.replace("{root}", str(root)) for a in extra]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["published"]["CLIP-Count"] == {"mae": published[0], "rmse": published[1]}
    assert "this model" in capsys.readouterr().out


def test_clipcount_eval_errors_are_for_people(tiny_checkpoint, tmp_path, capsys):
    root = write_shanghaitech(tmp_path / "data", "A")
    base = ["eval", "--model", str(tiny_checkpoint), "--root", str(root), "--no-progress"]
    assert main(base + ["--dataset", "shanghaitech"]) == 2
    assert "--part" in capsys.readouterr().err
    assert main(base + ["--dataset", "fsc147"]) == 2
    assert "FSC-147" in capsys.readouterr().err
    assert main(base + ["--dataset", "shanghaitech-a", "--stride", "500"]) == 2
    assert "stride" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(base + ["--dataset", "carpk"]) == 2


def test_windowing_option_is_used_and_recorded(tiny_checkpoint, tmp_path):
    from clipcount.errors import ConfigError
    from clipcount.modeling.checkpoint import load_model

    fsc = write_fsc147(tmp_path / "FSC147", {"train": 0, "val": 1})
    model = load_model(tiny_checkpoint)
    dataset = build_dataset("fsc147", fsc, "val")
    report = evaluate(model, dataset, stride=32, progress=False, device="cpu", windowing="published",
                      out_dir=tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["protocol"]["windowing"] == "published"
    predictor = DensityPredictor(model, stride=32, device="cpu", windowing="published")
    item = dataset[0]
    image = torch.from_numpy(item.image.transpose(2, 0, 1).copy())
    assert report.rows[0].predicted == pytest.approx(predictor.count(predictor.predict(image, [item.prompt])[0]),
                                                     rel=1e-5)
    with pytest.raises(ConfigError, match="divides the window"):
        evaluate(model, dataset, stride=24, progress=False, device="cpu", windowing="published")
