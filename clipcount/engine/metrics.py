"""Counting metrics, and writing results files that are never left half written.

Definitions (e = pred - gt over n images):
- MAE  = mean |e|.
- RMSE = sqrt(mean e^2).
- NAE  = sum |e| / sum gt, i.e. MAE / mean true count: the error relative to how much there is to
  count. (Some papers average |e| / gt per image instead, which explodes on images with few objects;
  this aggregate form stays finite unless every image is empty.)
- SRE  = sqrt(sum e^2 / sum gt^2): the squared-error analogue of NAE, RMSE relative to the root mean
  square true count.
NAE and SRE are NaN when every true count is 0 (nothing to be relative to); JSON files get null.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipcount.errors import DataError
from clipcount.imaging import atomic_write


@dataclass
class CountMetrics:
    mae: float
    rmse: float
    nae: float  # sum |e| / sum gt = MAE / mean true count
    sre: float  # sqrt(sum e^2 / sum gt^2)
    n: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def count_metrics(pred: Sequence[float], gt: Sequence[float]) -> CountMetrics:
    """Metrics of predicted against true counts, paired by position."""
    predicted = np.asarray(pred, dtype=np.float64).reshape(-1)
    truth = np.asarray(gt, dtype=np.float64).reshape(-1)
    if len(predicted) != len(truth):
        raise DataError(f"{len(predicted)} predicted counts but {len(truth)} true counts; they must pair up")
    if len(truth) == 0:
        raise DataError("no counts to score: the evaluation produced no predictions")
    for name, values in (("predicted", predicted), ("true", truth)):
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataError(f"{name} count #{bad[0]} is {values[bad[0]]}; every count must be a finite number")
    error = predicted - truth
    total_truth = truth.sum()
    total_truth_sq = (truth**2).sum()
    return CountMetrics(
        mae=float(np.abs(error).mean()),
        rmse=float(math.sqrt((error**2).mean())),
        nae=float(np.abs(error).sum() / total_truth) if total_truth > 0 else math.nan,
        sre=float(math.sqrt((error**2).sum() / total_truth_sq)) if total_truth_sq > 0 else math.nan,
        n=int(len(truth)),
    )


def per_class_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, CountMetrics]:
    """Metrics per prompt, from rows with "prompt", "gt" and "pred"; prompts in sorted order."""
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for index, row in enumerate(rows):
        missing = [key for key in ("prompt", "gt", "pred") if key not in row]
        if missing:
            raise DataError(f"result row #{index} lacks {', '.join(missing)}; rows need prompt, gt and pred")
        preds, gts = groups.setdefault(str(row["prompt"]), ([], []))
        preds.append(float(row["pred"]))
        gts.append(float(row["gt"]))
    return {prompt: count_metrics(*groups[prompt]) for prompt in sorted(groups)}


# ---- results files -----------------------------------------------------------------------------

def write_csv_atomic(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, fieldnames: Sequence[str]) -> None:
    """Write rows as CSV with a header; the file appears complete or not at all.

    Keys a row lacks are written empty; a key not in `fieldnames` is an error (a column would be lost).
    """
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames), restval="", extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON (indented, UTF-8, strict: NaN/inf become null); the file appears complete or not at all.

    Dataclasses (e.g. CountMetrics), numpy and torch scalars and arrays, tuples, sets and paths
    are converted.
    """
    text = json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def _jsonable(obj: Any) -> Any:
    """A copy of obj made of JSON types only."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj
        return [_jsonable(value) for value in items]
    if isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "tolist"):  # numpy, torch tensors
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON; convert it to numbers, text, lists or dicts")
