"""FSC-147 (Ranjan et al., CVPR 2021), the 384-high release used by CLIP-Count.

Layout under `root`:
    annotation_FSC147_384.json   {file: {"points": [[x, y], ...], "box_examples_coordinates":
                                  [[[x1, y1], [x1, y2], [x2, y2], [x2, y1]], ...], "H", "W", ...}}
    Train_Test_Val_FSC_147.json  {"train" | "val" | "test" | "val_coco" | "test_coco": [file, ...]}
    ImageClasses_FSC147.txt      file<TAB>class name, one per line
    images_384_VarV2/<file>      the JPEGs (all 384 pixels high)
Points are in `images_384_VarV2` pixel coordinates; the "H"/"W" fields are not trusted (the real
size is read from the image header).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from clipcount.data.sample import (
    POINT_TOLERANCE,
    BadItem,
    CountingDataset,
    SampleRecord,
    collect_records,
    image_record,
    require_file,
)
from clipcount.errors import DataError

SPLITS = ("train", "val", "test", "val_coco", "test_coco")
ANNOTATIONS = "annotation_FSC147_384.json"
SPLIT_FILE = "Train_Test_Val_FSC_147.json"
CLASS_FILE = "ImageClasses_FSC147.txt"
IMAGE_DIR = "images_384_VarV2"
_HINT = "download FSC-147 (github.com/cvlab-stonybrook/LearningToCountEverything) and pass its folder as root"


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-download or fix the file") from None


def read_class_file(path: Path) -> dict[str, str]:
    """`file<TAB>class` lines -> {file: class}. A line without a tab splits at its first space."""
    classes: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
            if len(parts) != 2 or not parts[1].strip():
                raise DataError(f"{path} line {lineno}: expected 'file<TAB>class name', got {line!r}")
            classes[parts[0].strip()] = parts[1].strip()
    return classes


def boxes_from_corners(corners: Any) -> np.ndarray:
    """FSC-147 example boxes (each 4 (x, y) corners) -> (K, 4) x1, y1, x2, y2."""
    arr = np.asarray(corners, dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float32)
    arr = arr.reshape(len(arr), -1, 2)  # (K, 4, 2)
    return np.concatenate([arr.min(1), arr.max(1)], axis=1)


class FSC147(CountingDataset):
    """One FSC-147 split; each item is a CountingSample with the image's class as prompt."""

    dataset_name = "FSC-147"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        skip_bad: bool = False,
        tolerance: float = POINT_TOLERANCE,
    ):
        if split not in SPLITS:
            raise DataError(f"unknown FSC-147 split {split!r}; choose one of {', '.join(SPLITS)}")
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DataError(f"FSC-147 root {self.root} is not a folder; {_HINT}")
        annotations = read_json(require_file(self.root / ANNOTATIONS, "FSC-147 annotation file", _HINT))
        splits = read_json(require_file(self.root / SPLIT_FILE, "FSC-147 split file", _HINT))
        classes = read_class_file(require_file(self.root / CLASS_FILE, "FSC-147 class file", _HINT))
        image_dir = self.root / IMAGE_DIR
        if not image_dir.is_dir():
            raise DataError(f"FSC-147 image folder {image_dir} not found; {_HINT}")
        if split not in splits:
            raise DataError(f"{self.root / SPLIT_FILE} has no {split!r} list (it has {sorted(splits)})")

        def make(name: str) -> SampleRecord:
            entry = annotations.get(name)
            if entry is None:
                raise BadItem(f"{name} is in the {split!r} split but has no entry in {self.root / ANNOTATIONS}")
            if name not in classes:
                raise BadItem(f"{name} is in the {split!r} split but has no class in {self.root / CLASS_FILE}")
            if "points" not in entry:
                raise BadItem(f"{name} has no 'points' in {self.root / ANNOTATIONS}")
            boxes = boxes_from_corners(entry.get("box_examples_coordinates", []))
            return image_record(
                name, image_dir / name, classes[name], entry["points"],
                where=f"{self.root / ANNOTATIONS} entry {name}", boxes=boxes, tolerance=tolerance,
            )

        records, skipped = collect_records(splits[split], make, self.dataset_name, skip_bad)
        super().__init__(records, skipped)

    @property
    def classes(self) -> list[str]:
        """Class name of each sample, aligned with `names` (same as `prompts`)."""
        return self.prompts
