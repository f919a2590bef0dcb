"""Your own images: a folder plus a points file, one sample per (image, class).

Points file formats (paths of images relative to the folder):
- JSON: {"image.jpg": [{"class": "apples", "points": [[x, y], ...], "boxes": [[x1, y1, x2, y2], ...],
  "split": "train"}, ...]} ("boxes" and "split" optional). A class with an empty points list is a
  sample with count 0.
- CSV with header `image,class,x,y` and an optional `split` column: one row per point; a row with
  empty x and y declares an (image, class) with no objects.
When `annotations` is not given, `annotations.json` or `annotations.csv` in the folder is used.

Splits: `split` picks the images labelled so ("train", "val", "test"; "all" or None: every image).
A file without split labels is split by a fixed rule so that training and evaluation agree without
any bookkeeping: HELD_OUT_FRACTION of the images (at least one, when there are two or more),
chosen by a hash of the file name, are "test" (and "val"); the rest are "train".
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

from clipcount.data.fsc147 import read_json
from clipcount.data.sample import (
    POINT_TOLERANCE,
    CountingDataset,
    SampleRecord,
    collect_records,
    image_record,
)
from clipcount.errors import DataError

_CSV_COLUMNS = ("image", "class", "x", "y")
SPLITS = ("train", "val", "test")
HELD_OUT_FRACTION = 0.2  # of a file without split labels: held out as "test" (and "val")


def _find_annotations(root: Path) -> Path:
    for name in ("annotations.json", "annotations.csv"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"no annotations file given and no annotations.json or annotations.csv in {root}; "
                    "give the points file with --annotations FILE")


def read_json_points(path: Path) -> dict[str, list[dict[str, Any]]]:
    """{image: [{"class", "points", "boxes"?}, ...]} validated for shape."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected {{image: [{{'class': ..., 'points': [[x, y], ...]}}]}}")
    out: dict[str, list[dict[str, Any]]] = {}
    for image, entries in data.items():
        if isinstance(entries, dict):  # one class per image written without the list
            entries = [entries]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "class" in e for e in entries):
            raise DataError(f"{path} entry {image!r}: expected a list of {{'class': ..., 'points': [...]}}")
        out[image] = [{"class": str(e["class"]).strip(), "points": e.get("points", []), "boxes": e.get("boxes"),
                       "split": _split_label(e.get("split"), f"{path} entry {image!r}")} for e in entries]
    return out


def read_csv_points(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows image,class,x,y grouped into the JSON structure."""
    grouped: dict[str, dict[str, list[list[float]]]] = {}
    splits: dict[str, str | None] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = tuple(h.strip().lower() for h in (reader.fieldnames or []))
        if not set(_CSV_COLUMNS) <= set(header):
            raise DataError(
                f"{path}: the CSV header must name the columns {','.join(_CSV_COLUMNS)}, got {','.join(header)}"
            )
        for lineno, row in enumerate(reader, 2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row["image"] or not row["class"]:
                raise DataError(f"{path} line {lineno}: image and class must not be empty")
            split = _split_label(row.get("split"), f"{path} line {lineno}")
            if splits.setdefault(row["image"], split) != split:
                raise DataError(f"{path} line {lineno}: {row['image']} is in split {splits[row['image']]!r} "
                                f"on an earlier line and {split!r} here; give each image one split")
            points = grouped.setdefault(row["image"], {}).setdefault(row["class"], [])
            if row["x"] == "" and row["y"] == "":
                continue  # declares an (image, class) with no objects
            try:
                points.append([float(row["x"]), float(row["y"])])
            except ValueError:
                raise DataError(
                    f"{path} line {lineno}: x and y must be numbers, got {row['x']!r}, {row['y']!r}"
                ) from None
    return {image: [{"class": c, "points": p, "boxes": None, "split": splits[image]} for c, p in classes.items()]
            for image, classes in grouped.items()}


def _split_label(value: Any, where: str) -> str | None:
    """A split label from the points file: train, val or test; empty or missing -> None."""
    if value is None or str(value).strip() == "":
        return None
    label = str(value).strip().lower()
    if label not in SPLITS:
        raise DataError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return label


def image_splits(table: dict[str, list[dict[str, Any]]], where: str) -> dict[str, str]:
    """{image: split} from the file's labels, or by the held-out rule when the file has none."""
    labels = {image: {entry.get("split") for entry in entries} for image, entries in table.items()}
    for image, found in labels.items():
        if len(found) > 1:
            raise DataError(f"{where}: {image} is labelled with several splits {sorted(map(str, found))}; "
                            "give each image one split")
    labelled = {image: next(iter(found)) for image, found in labels.items()}
    if any(label is not None for label in labelled.values()):
        missing = [image for image, label in labelled.items() if label is None]
        if missing:
            raise DataError(f"{where}: {len(missing)} image(s) have no split (e.g. {missing[0]}) while others do; "
                            f"label every image or none")
        return labelled  # type: ignore[return-value]
    return held_out_split(list(table))


def held_out_split(images: list[str], fraction: float = HELD_OUT_FRACTION) -> dict[str, str]:
    """{image: "train" | "test"}: a fixed `fraction` (at least one of two or more) held out as test.

    Chosen by a hash of each name, so adding images moves few others and every run agrees."""
    if len(images) < 2:
        return {image: "train" for image in images}
    held = max(1, round(fraction * len(images)))
    order = sorted(images, key=lambda name: hashlib.sha1(name.encode("utf-8")).hexdigest())
    test = set(order[:held])
    return {image: "test" if image in test else "train" for image in images}


def _select(split: str | None, splits: dict[str, str], where: str) -> list[str]:
    """The images of `split` ("val" reads the held-out part when the file has no val labels)."""
    if split is None or split.strip().lower() == "all":
        return list(splits)
    wanted = split.strip().lower()
    if wanted not in SPLITS:
        raise DataError(f"unknown split {split!r} for a folder dataset; choose train, val, test or all")
    present = set(splits.values())
    if wanted == "val" and "val" not in present:
        wanted = "test"
    chosen = [image for image, label in splits.items() if label == wanted]
    if not chosen:
        raise DataError(f"{where}: no image is in split {split!r} (splits present: {', '.join(sorted(present))}); "
                        "choose another --split, or --split all")
    return chosen


class FolderDataset(CountingDataset):
    """Images under `root` annotated by a JSON or CSV points file; `split` as in the module notes."""

    dataset_name = "folder"

    def __init__(
        self,
        root: str | Path,
        annotations: str | Path | None = None,
        split: str | None = None,
        skip_bad: bool = False,
        tolerance: float = POINT_TOLERANCE,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} not found")
        path = _find_annotations(self.root) if annotations is None else Path(annotations)
        if not path.is_file():
            raise DataError(f"annotations file {path} not found")
        table = read_csv_points(path) if path.suffix.lower() == ".csv" else read_json_points(path)

        self.splits = image_splits(table, str(path))  # {image: "train" | "val" | "test"}
        chosen = _select(split, self.splits, str(path))

        def make(image: str) -> list[SampleRecord]:
            return [
                image_record(image, self.root / image, entry["class"], entry["points"],
                             where=f"{path} ({image}, {entry['class']})", boxes=entry["boxes"], tolerance=tolerance)
                for entry in table[image]
            ]

        records, skipped = collect_records(chosen, make, self.dataset_name, skip_bad)
        super().__init__(records, skipped)
