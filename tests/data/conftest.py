"""Tiny on-disk datasets in the exact published layouts, written into tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image


def write_image(path: Path, height: int, width: int, seed: int = 0, orientation: int | None = None) -> Path:
    """A random RGB image; `orientation` stores an EXIF orientation tag (JPEG only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    im = Image.fromarray(pixels)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(path, exif=exif.tobytes())
    else:
        im.save(path)
    return path


def corners(x1: float, y1: float, x2: float, y2: float) -> list[list[float]]:
    return [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]


FSC_IMAGES = {  # name: (height, width, class, points)
    "1.jpg": (384, 512, "apples", [[10.5, 20.0], [100.0, 200.0], [511.5, 383.9]]),
    "2.jpg": (384, 400, "apples", [[50.0, 50.0], [50.0, 50.0]]),  # coincident points
    "3.jpg": (384, 300, "sea shells", [[5.0, 5.0]]),
    "4.jpg": (384, 420, "cars", [[1.0, 1.0], [400.0, 380.0], [-0.5, 384.6]]),  # last one within 1 px
}


@pytest.fixture
def fsc147_root(tmp_path: Path) -> Path:
    root = tmp_path / "FSC147"
    annotations = {}
    for i, (name, (h, w, _, points)) in enumerate(FSC_IMAGES.items()):
        write_image(root / "images_384_VarV2" / name, h, w, seed=i)
        annotations[name] = {
            "points": points,
            "box_examples_coordinates": [corners(1, 2, 11, 12), corners(20, 30, 40, 50), corners(5, 5, 9, 9)],
            "H": h * 2, "W": w * 2, "ratio_h": 0.5, "ratio_w": 0.5,  # original size, not to be trusted
        }
    (root / "annotation_FSC147_384.json").write_text(json.dumps(annotations))
    splits = {"train": ["1.jpg", "2.jpg"], "val": ["3.jpg"], "test": ["4.jpg"], "val_coco": [], "test_coco": ["3.jpg"]}
    (root / "Train_Test_Val_FSC_147.json").write_text(json.dumps(splits))
    lines = [f"{name}\t{cls}" for name, (_, _, cls, _) in FSC_IMAGES.items()]
    (root / "ImageClasses_FSC147.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def carpk_root(tmp_path: Path) -> Path:
    root = tmp_path / "CARPK"
    boxes = {"20161225_TPZ_00001": [[10, 10, 30, 20], [100, 50, 120, 70], [100, 50, 120, 70]],
             "20161225_TPZ_00002": [[0, 0, 8, 8]]}
    for i, (stem, bx) in enumerate(boxes.items()):
        write_image(root / "Images" / f"{stem}.png", 180, 240, seed=i)
        text = "".join(f"{x1} {y1} {x2} {y2} 1\n" for x1, y1, x2, y2 in bx)
        (root / "Annotations" / f"{stem}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.txt").write_text(text)
    (root / "ImageSets").mkdir(parents=True)
    (root / "ImageSets" / "test.txt").write_text("\n".join(boxes) + "\n")
    return root


def write_shanghaitech_gt(path: Path, points: np.ndarray) -> None:
    """GT_IMG_k.mat as published: image_info = 1x1 cell holding a 1x1 struct (location, number)."""
    struct = np.zeros((1, 1), dtype=[("location", "O"), ("number", "O")])
    struct[0, 0]["location"] = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    struct[0, 0]["number"] = np.array([[len(points)]], dtype=np.float64)
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = struct
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"image_info": cell})


def make_shanghaitech(root: Path, part_dir: str, split: str = "test") -> Path:
    data = root / part_dir / f"{split}_data"
    shapes = {"IMG_1": (120, 160, [[3.0, 4.0], [150.5, 110.0]]),
              "IMG_2": (160, 120, [[60.0, 80.0]]),
              "IMG_10": (100, 100, [])}
    for i, (stem, (h, w, pts)) in enumerate(shapes.items()):
        write_image(data / "images" / f"{stem}.jpg", h, w, seed=i)
        write_shanghaitech_gt(data / "ground-truth" / f"GT_{stem}.mat", np.array(pts, dtype=np.float64))
    return root
