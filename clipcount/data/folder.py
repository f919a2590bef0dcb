"""Your own images: a folder plus a points file, one sample per (image, class).

Points file formats (paths of images relative to the folder):
- JSON: {"image.jpg": [{"class": "apples", "points": [[x, y], ...], "boxes": [[x1, y1, x2, y2], ...]}, ...]}
  ("boxes" optional). A class with an empty points list is a sample with count 0.
- CSV with header `image,class,x,y`: one row per point; a row with empty x and y declares an
  (image, class) with no objects.
When `annotations` is not given, `annotations.json` or `annotations.csv` in the folder is used.
"""

from __future__ import annotations

import csv
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


def _find_annotations(root: Path) -> Path:
    for name in ("annotations.json", "annotations.csv"):
        if (root / name).is_file():
            return root / name
    raise DataError(f"no annotations file given and no annotations.json/.csv in {root}; pass annotations=")


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
        out[image] = [{"class": str(e["class"]).strip(), "points": e.get("points", []), "boxes": e.get("boxes")}
                      for e in entries]
    return out


def read_csv_points(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Rows image,class,x,y grouped into the JSON structure."""
    grouped: dict[str, dict[str, list[list[float]]]] = {}
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
            points = grouped.setdefault(row["image"], {}).setdefault(row["class"], [])
            if row["x"] == "" and row["y"] == "":
                continue  # declares an (image, class) with no objects
            try:
                points.append([float(row["x"]), float(row["y"])])
            except ValueError:
                raise DataError(
                    f"{path} line {lineno}: x and y must be numbers, got {row['x']!r}, {row['y']!r}"
                ) from None
    return {image: [{"class": c, "points": p, "boxes": None} for c, p in classes.items()]
            for image, classes in grouped.items()}


class FolderDataset(CountingDataset):
    """Images under `root` annotated by a JSON or CSV points file."""

    dataset_name = "folder"

    def __init__(
        self,
        root: str | Path,
        annotations: str | Path | None = None,
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

        def make(image: str) -> list[SampleRecord]:
            records = []
            return [
                image_record(image, self.root / image, entry["class"], entry["points"],
                             where=f"{path} ({image}, {entry['class']})", boxes=entry["boxes"], tolerance=tolerance)
                for entry in table[image]
            ]

        records, skipped = collect_records(list(table), make, self.dataset_name, skip_bad)
        super().__init__(records, skipped)
