"""Dataset evaluation: every image through the window protocol, scored overall and per class.

Each sample's image goes through `DensityPredictor` (resized to the model's image height, cut
into windows at `stride`, blended back), its count is the density's sum / density scale, and the
ground truth is the number of annotated points (or the published count where there are no points,
as in FSC-147-S). ShanghaiTech's portrait images are turned to landscape first, as published.

Results: MAE, RMSE, NAE, SRE (definitions in `clipcount.engine.metrics`) overall and per prompt;
with `out_dir`, a per-image `predictions.csv` (image, prompt, gt, predicted, error) and a
`summary.json`, both written atomically. Where the reference notes give published scores for the
dataset (FSC-147 val/test, CARPK, ShanghaiTech A/B for CLIP-Count; FSC-147-S-v2 for six methods)
they are reported beside ours.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from clipcount.engine.metrics import CountMetrics, count_metrics, per_class_metrics, write_csv_atomic, write_json_atomic
from clipcount.errors import DataError, ImageError

PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
CSV_COLUMNS = ("image", "prompt", "gt", "predicted", "error")

# Published (MAE, RMSE), from the reference notes. CLIP-Count's are its released checkpoint's.
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "fsc147/val": {"CLIP-Count": (18.93, 66.10)},
    "fsc147/test": {"CLIP-Count": (17.45, 104.88)},
    "carpk/test": {"CLIP-Count": (11.70, 13.94)},
    "shanghaitech-a/test": {"CLIP-Count": (197.47, 319.75)},
    "shanghaitech-b/test": {"CLIP-Count": (47.92, 80.48)},
    "fsc147-s": {
        "CLIP-Count": (45.59, 98.96), "CounTX": (28.67, 89.18), "VLCounter": (33.10, 69.34),
        "PseCo": (30.53, 43.92), "DAVE": (46.36, 97.11), "T2ICount": (5.99, 10.55),
    },
}


class Predictor(Protocol):
    """What evaluation needs of a predictor (`clipcount.engine.inference.DensityPredictor`)."""

    window: int

    def predict(self, image: torch.Tensor, prompts: list[str]) -> list[torch.Tensor]: ...

    def count(self, density: torch.Tensor) -> float: ...


@dataclass
class EvalRow:
    image: str
    prompt: str
    gt: float
    predicted: float

    @property
    def error(self) -> float:
        return self.predicted - self.gt


@dataclass
class EvalReport:
    dataset: str  # a readable name, e.g. "FSC-147 test"
    overall: CountMetrics
    per_class: dict[str, CountMetrics]
    rows: list[EvalRow]
    published: dict[str, tuple[float, float]] = field(default_factory=dict)  # method -> (MAE, RMSE)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    stride: int = 128
    window: int = 384
    windowing: str = "clipcount"  # engine.windows scheme used
    seconds: float = 0.0
    predictions_csv: Path | None = None
    summary_json: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "n": self.overall.n,
            "overall": self.overall.to_dict(),
            "per_class": {name: m.to_dict() for name, m in self.per_class.items()},
            "published": {name: {"mae": mae, "rmse": rmse} for name, (mae, rmse) in self.published.items()},
            "protocol": {"window": self.window, "stride": self.stride, "image_height": self.window,
                         "windowing": self.windowing},
            "skipped": [{"image": name, "reason": reason} for name, reason in self.skipped],
            "seconds": round(self.seconds, 3),
        }

    def table(self) -> str:
        """The overall scores, and published ones beside them, as a small text table."""
        m = self.overall
        lines = [f"{self.dataset} ({m.n} images)", f"{'':<26}{'MAE':>9}{'RMSE':>9}{'NAE':>8}{'SRE':>8}",
                 f"{'this model':<26}{m.mae:>9.2f}{m.rmse:>9.2f}{_fmt(m.nae):>8}{_fmt(m.sre):>8}"]
        for name, (mae, rmse) in self.published.items():
            lines.append(f"{'published: ' + name:<26}{mae:>9.2f}{rmse:>9.2f}{'':>8}{'':>8}")
        if self.skipped:
            lines.append(f"({len(self.skipped)} image(s) skipped; see the summary)")
        return "\n".join(lines)


def evaluate(
    model,
    dataset: Sequence,
    stride: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    *,
    predictor: Predictor | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    max_batch: int = 64,
    landscape: bool | None = None,
    skip_bad: bool = False,
    published_key: str | None = None,
    name: str | None = None,
    windowing: str | None = None,
) -> EvalReport:
    """Count every sample of `dataset` (CountingSamples) with `model` and score the counts.

    `stride` defaults to a third of the model's window (128 for 384, the published protocol).
    `landscape` rotates portrait images first (default: only for ShanghaiTech). `skip_bad` skips
    images that fail to load, with a warning, instead of stopping. `published_key` picks the
    published scores to show (default: guessed from the dataset, e.g. "fsc147/test").
    `predictor` replaces the DensityPredictor built from `model` (tests, custom pipelines).
    `windowing`: "clipcount" or "published" (default: the model's config; converted published
    checkpoints use "published", the published evaluation, to reproduce its scores).
    """
    from clipcount.data.augment import to_landscape

    started = time.time()
    if predictor is None:
        from clipcount.engine.inference import DensityPredictor

        window = model.config.window_size
        stride = stride or max(1, window // 3)
        _check_stride(stride, window)
        from clipcount.api import check_windowing

        check_windowing(windowing or model.config.windowing, stride, window, model.config.resize_height)
        predictor = DensityPredictor(model, stride=stride, max_batch=max_batch, device=device, precision=precision,
                                     windowing=windowing)
    window = int(getattr(predictor, "window", 0) or 0)
    stride = stride or getattr(predictor, "stride", None) or max(1, window // 3)
    dataset_name = str(getattr(dataset, "dataset_name", type(dataset).__name__))
    if landscape is None:
        landscape = dataset_name.lower().startswith("shanghaitech")
    key = published_key if published_key is not None else guess_published_key(dataset)

    rows: list[EvalRow] = []
    skipped = list(getattr(dataset, "skipped", []))
    for index in _progress(range(len(dataset)), progress, dataset_name):
        try:
            sample = dataset[index]
        except (DataError, ImageError) as error:
            if not skip_bad:
                raise
            label = _sample_name(dataset, index)
            warnings.warn(f"{dataset_name}: skipping {label}: {error}", stacklevel=2)
            skipped.append((label, str(error)))
            continue
        if landscape:
            sample = to_landscape(sample)
        image = torch.from_numpy(np.ascontiguousarray(sample.image.transpose(2, 0, 1)))  # (3, H, W)
        density = predictor.predict(image, [sample.prompt])[0]
        rows.append(EvalRow(sample.name, sample.prompt, float(sample.count), float(predictor.count(density))))

    if not rows:
        raise DataError(f"{dataset_name}: no image could be evaluated ({len(skipped)} skipped)")
    records = [{"prompt": r.prompt, "gt": r.gt, "pred": r.predicted} for r in rows]
    report = EvalReport(
        dataset=name or _display_name(dataset),
        overall=count_metrics([r.predicted for r in rows], [r.gt for r in rows]),
        per_class=per_class_metrics(records),
        rows=rows,
        published=dict(PUBLISHED.get(key, {})) if key else {},
        skipped=skipped,
        stride=int(stride),
        window=window,
        windowing=str(getattr(predictor, "windowing", "clipcount")),
    )
    report.seconds = time.time() - started
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


def write_report(report: EvalReport, out_dir: Path) -> None:
    """predictions.csv and summary.json into `out_dir`, each written atomically."""
    report.predictions_csv = out_dir / PREDICTIONS_FILE
    report.summary_json = out_dir / SUMMARY_FILE
    csv_rows = [{"image": r.image, "prompt": r.prompt, "gt": _num(r.gt), "predicted": f"{r.predicted:.4f}",
                 "error": f"{r.error:.4f}"} for r in report.rows]
    write_csv_atomic(csv_rows, report.predictions_csv, CSV_COLUMNS)
    write_json_atomic(report.summary(), report.summary_json)


def guess_published_key(dataset) -> str | None:
    """The PUBLISHED key of a dataset reader ("fsc147/test", "fsc147-s", "carpk/test", ...)."""
    name = str(getattr(dataset, "dataset_name", "")).lower()
    split = getattr(dataset, "split", None)
    if name == "fsc-147-s":
        return "fsc147-s"
    if name == "fsc-147":
        return f"fsc147/{split}"
    if name == "carpk":
        return f"carpk/{split}"
    if name.startswith("shanghaitech-"):
        return f"shanghaitech-{name[-1]}/{split}"
    return None


def _check_stride(stride: int, window: int) -> None:
    from clipcount.errors import ConfigError

    if not 0 < stride <= window:
        raise ConfigError(f"stride {stride} must be between 1 and the model's window size {window}")


def _display_name(dataset) -> str:
    name = str(getattr(dataset, "dataset_name", type(dataset).__name__))
    split = getattr(dataset, "split", None)
    return f"{name} {split}" if split and name != "FSC-147-S" else name


def _sample_name(dataset, index: int) -> str:
    names = getattr(dataset, "names", None)
    return str(names[index]) if names is not None else f"sample #{index}"


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"eval {desc}", unit="image", dynamic_ncols=True)


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"
