"""ShanghaiTech crowd counting (Zhang et al., CVPR 2016), parts A (dense) and B (sparse).

Layout: `root` holds `part_A/` and `part_B/` (or `part_A_final/` and `part_B_final/`, as some
downloads name them; `root` may also be the part folder itself), each with
    <split>_data/images/IMG_<k>.jpg
    <split>_data/ground-truth/GT_IMG_<k>.mat   head points at image_info[0][0][0][0][0], (N, 2) x, y
Prompt "people". Evaluation rotates portrait images to landscape
(`clipcount.data.augment.to_landscape`); this reader returns them as stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from clipcount.data.sample import (
    POINT_TOLERANCE,
    BadItem,
    CountingDataset,
    SampleRecord,
    collect_records,
    image_record,
    sorted_naturally,
)
from clipcount.errors import DataError

PARTS = ("A", "B")
SPLITS = ("train", "test")


def find_part_dir(root: Path, part: str, split: str) -> Path:
    """The folder holding `<split>_data` for this part, accepting the known layouts."""
    candidates = [root / f"part_{part}", root / f"part_{part}_final", root]
    for folder in candidates:
        if (folder / f"{split}_data").is_dir():
            return folder
    tried = ", ".join(str(c / f"{split}_data") for c in candidates)
    raise DataError(
        f"ShanghaiTech part {part} {split} data not found (looked for {tried}); pass the folder that "
        f"contains part_{part}/ (or part_{part}_final/) as root"
    )


def read_head_points(path: Path) -> np.ndarray:
    """(N, 2) x, y head positions from a ShanghaiTech GT_*.mat file."""
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises several unrelated types for a damaged file
        raise BadItem(f"cannot read {path} ({exc}); re-download the ground truth") from None
    try:
        location = mat["image_info"][0][0][0][0][0]
        points = np.asarray(location, dtype=np.float32)
    except (KeyError, IndexError, TypeError, ValueError):
        raise BadItem(f"{path} does not hold points at image_info[0][0][0][0][0] (ShanghaiTech layout)") from None
    if points.size == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 2:
        raise BadItem(f"{path}: expected (N, 2) points at image_info[0][0][0][0][0], got shape {points.shape}")
    return points


class ShanghaiTech(CountingDataset):
    """ShanghaiTech part A or B, train or test split; prompt "people"."""

    dataset_name = "ShanghaiTech"

    def __init__(
        self,
        root: str | Path,
        part: str = "A",
        split: str = "test",
        skip_bad: bool = False,
        prompt: str = "people",
        tolerance: float = POINT_TOLERANCE,
    ):
        part = part.upper()
        if part not in PARTS:
            raise DataError(f"unknown ShanghaiTech part {part!r}; choose A or B")
        if split not in SPLITS:
            raise DataError(f"unknown ShanghaiTech split {split!r}; choose one of {', '.join(SPLITS)}")
        self.root, self.part, self.split = Path(root), part, split
        self.dataset_name = f"ShanghaiTech-{part}"
        data_dir = find_part_dir(self.root, part, split) / f"{split}_data"
        image_dir, gt_dir = data_dir / "images", data_dir / "ground-truth"
        if not image_dir.is_dir():
            raise DataError(f"ShanghaiTech image folder {image_dir} not found")
        names = sorted_naturally([p.name for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")])
        if not names:
            raise DataError(f"no images in {image_dir}")

        def make(name: str) -> SampleRecord:
            gt = gt_dir / f"GT_{Path(name).stem}.mat"
            if not gt.is_file():
                raise BadItem(f"ground truth {gt} for image {image_dir / name} not found")
            return image_record(name, image_dir / name, prompt, read_head_points(gt), where=str(gt),
                                tolerance=tolerance)

        records, skipped = collect_records(names, make, self.dataset_name, skip_bad)
        super().__init__(records, skipped)
