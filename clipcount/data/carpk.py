"""CARPK (Hsieh et al., ICCV 2017): cars in drone images of parking lots.

Layout under `root`:
    ImageSets/<split>.txt        image names without extension, one per line
    Images/<name>.png
    Annotations/<name>.txt       one car per line: x1 y1 x2 y2 class
The count is the number of annotation lines; points are the box centres. Evaluation resizes the
images so the shorter side is 384 (`clipcount.data.augment.resize_short_side`); this reader returns
them at full size.
"""

from __future__ import annotations

from pathlib import Path

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

_HINT = "pass the CARPK folder (with ImageSets/, Images/, Annotations/) as root"


def read_car_boxes(path: Path) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 from a CARPK annotation file (fifth column: class id, ignored)."""
    boxes = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            fields = raw.split()
            if not fields:
                continue
            try:
                if len(fields) < 4:
                    raise ValueError
                boxes.append([float(v) for v in fields[:4]])
            except ValueError:
                raise BadItem(f"{path} line {lineno}: expected 'x1 y1 x2 y2 class', got {raw.strip()!r}") from None
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


class CARPK(CountingDataset):
    """CARPK split; prompt "car"."""

    dataset_name = "CARPK"

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        skip_bad: bool = False,
        prompt: str = "car",
        tolerance: float = POINT_TOLERANCE,
    ):
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DataError(f"CARPK root {self.root} is not a folder; {_HINT}")
        listing = require_file(self.root / "ImageSets" / f"{split}.txt", f"CARPK {split!r} list", _HINT)
        names = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]

        def make(name: str) -> SampleRecord:
            stem = Path(name).stem if name.endswith(".png") else name
            ann = self.root / "Annotations" / f"{stem}.txt"
            if not ann.is_file():
                raise BadItem(f"annotation file {ann} for {stem} (listed in {listing}) not found")
            boxes = read_car_boxes(ann)
            centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
            return image_record(f"{stem}.png", self.root / "Images" / f"{stem}.png", prompt, centres,
                                where=str(ann), tolerance=tolerance)

        records, skipped = collect_records(names, make, self.dataset_name, skip_bad)
        super().__init__(records, skipped)
