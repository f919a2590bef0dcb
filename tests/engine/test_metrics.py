"""Counting metrics by hand-checked examples; results files written whole or not at all."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcount.engine.metrics import (
    CountMetrics,
    count_metrics,
    per_class_metrics,
    write_csv_atomic,
    write_json_atomic,
)
from clipcount.errors import DataError


def test_count_metrics_by_hand():
    result = count_metrics([12, 7, 30], [10, 10, 30])  # errors +2, -3, 0
    assert result.n == 3
    assert result.mae == pytest.approx(5 / 3)
    assert result.rmse == pytest.approx(math.sqrt(13 / 3))
    assert result.nae == pytest.approx(5 / 50)  # = MAE / mean true count
    assert result.nae == pytest.approx(result.mae / np.mean([10, 10, 30]))
    assert result.sre == pytest.approx(math.sqrt(13 / 1100))


def test_perfect_and_empty_truth():
    perfect = count_metrics(np.array([1.0, 2.0]), (1, 2))
    assert (perfect.mae, perfect.rmse, perfect.nae, perfect.sre) == (0, 0, 0, 0)
    nothing = count_metrics([1.0, 0.0], [0, 0])
    assert nothing.mae == 0.5 and math.isnan(nothing.nae) and math.isnan(nothing.sre)


@pytest.mark.parametrize("pred,gt,message", [
    ([1, 2], [1], "pair up"),
    ([], [], "no counts"),
    ([1, float("nan")], [1, 2], "predicted count #1"),
    ([1, 2], [1, float("inf")], "true count #1"),
])
def test_count_metrics_refuses_bad_input(pred, gt, message):
    with pytest.raises(DataError, match=message):
        count_metrics(pred, gt)


def test_per_class_metrics():
    rows = [
        {"prompt": "apples", "gt": 10, "pred": 12},
        {"prompt": "cars", "gt": 5, "pred": 5, "image": "x.jpg"},
        {"prompt": "apples", "gt": 20, "pred": 17},
    ]
    result = per_class_metrics(iter(rows))
    assert list(result) == ["apples", "cars"]
    assert result["apples"] == count_metrics([12, 17], [10, 20])
    assert result["cars"].n == 1 and result["cars"].mae == 0
    with pytest.raises(DataError, match="row #0 lacks pred"):
        per_class_metrics([{"prompt": "a", "gt": 1}])


def test_write_csv_atomic(tmp_path):
    path = tmp_path / "results" / "per_image.csv"
    rows = [{"image": "a,b.jpg", "prompt": "red apples", "gt": 3, "pred": 2.5}, {"image": "c.jpg", "gt": 1}]
    write_csv_atomic(rows, path, ["image", "prompt", "gt", "pred"])
    with open(path, newline="", encoding="utf-8") as handle:
        read = list(csv.DictReader(handle))
    assert read == [{"image": "a,b.jpg", "prompt": "red apples", "gt": "3", "pred": "2.5"},
                    {"image": "c.jpg", "prompt": "", "gt": "1", "pred": ""}]
    assert [p.name for p in path.parent.iterdir()] == ["per_image.csv"]


def test_write_csv_atomic_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")

    def rows():
        yield {"image": "a.jpg"}
        raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_csv_atomic(rows(), path, ["image"])
    with pytest.raises(ValueError):
        write_csv_atomic([{"unknown": 1}], path, ["image"])  # a column would be lost
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


@dataclass
class _Record:
    name: str
    value: float


def test_write_json_atomic(tmp_path):
    path = tmp_path / "summary.json"
    summary = {
        "overall": count_metrics([1, 2], [1, 3]),
        "per_class": {"cars": CountMetrics(1.0, 2.0, float("nan"), float("inf"), 4)},
        "array": np.arange(3), "scalar": np.float32(0.5), "tensor": torch.tensor([1.5]),
        "path": Path("a/b.jpg"), "tuple": (1, 2), "record": _Record("x", 1.0), "flag": np.bool_(True),
        "text": "Äpfel",
    }
    write_json_atomic(summary, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["overall"]["mae"] == 0.5 and data["overall"]["n"] == 2
    assert data["per_class"]["cars"]["nae"] is None and data["per_class"]["cars"]["sre"] is None
    assert data["array"] == [0, 1, 2] and data["scalar"] == 0.5 and data["tensor"] == [1.5]
    assert data["path"] == "a/b.jpg" and data["tuple"] == [1, 2] and data["flag"] is True
    assert data["record"] == {"name": "x", "value": 1.0} and data["text"] == "Äpfel"


def test_write_json_atomic_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json_atomic({"version": 1}, path)
    with pytest.raises(TypeError, match="object"):
        write_json_atomic({"bad": object()}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # fails at the last step
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic({"version": 2}, path)
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
