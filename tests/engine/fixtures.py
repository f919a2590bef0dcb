"""Tiny datasets in the exact published on-disk layouts, for the training and evaluation tests.

Images are small (64 px high: the tiny model's window) and show their objects as bright blobs on
a dark, slightly noisy background, so a tiny model has something learnable to count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

CLASSES = ("apples", "cars")
COLOURS = {"apples": (230, 40, 40), "cars": (40, 90, 230)}


def draw_objects(height: int, width: int, points: np.ndarray, colour: tuple[int, int, int], seed: int) -> np.ndarray:
    """(H, W, 3) uint8: a dark noisy background with a disc of `colour` at each (x, y) point."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, size=(height, width, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    for x, y in points:
        disc = (xx - x) ** 2 + (yy - y) ** 2 <= 2.5**2
        image[disc] = colour
    return image.clip(0, 255).astype(np.uint8)


def random_points(rng: np.random.Generator, count: int, height: int, width: int, margin: float = 3.0) -> np.ndarray:
    xs = rng.uniform(margin, width - margin, size=count)
    ys = rng.uniform(margin, height - margin, size=count)
    return np.stack([xs, ys], axis=1).round(1)


def corners(x1: float, y1: float, x2: float, y2: float) -> list[list[float]]:
    return [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]


def write_fsc147(root: Path, splits: dict[str, int] | None = None, height: int = 64, width: int = 96,
                 seed: int = 0) -> Path:
    """FSC-147 as published (annotation_FSC147_384.json, Train_Test_Val_FSC_147.json,
    ImageClasses_FSC147.txt, images_384_VarV2/), `splits[name]` images per split, classes alternating."""
    splits = splits or {"train": 8, "val": 2, "test": 2}
    rng = np.random.default_rng(seed)
    images = root / "images_384_VarV2"
    images.mkdir(parents=True, exist_ok=True)
    annotations, lists, classes = {}, {name: [] for name in ("train", "val", "test", "val_coco", "test_coco")}, {}
    number = 1
    for split, amount in splits.items():
        for i in range(amount):
            name, cls = f"{number}.jpg", CLASSES[i % len(CLASSES)]
            points = random_points(rng, int(rng.integers(2, 9)), height, width)
            Image.fromarray(draw_objects(height, width, points, COLOURS[cls], seed + number)).save(images / name, quality=95)
            annotations[name] = {
                "points": points.tolist(),
                "box_examples_coordinates": [corners(x - 3, y - 3, x + 3, y + 3) for x, y in points[:3]],
                "H": height * 2, "W": width * 2, "ratio_h": 0.5, "ratio_w": 0.5,
            }
            lists[split].append(name)
            classes[name] = cls
            number += 1
    (root / "annotation_FSC147_384.json").write_text(json.dumps(annotations))
    (root / "Train_Test_Val_FSC_147.json").write_text(json.dumps(lists))
    (root / "ImageClasses_FSC147.txt").write_text("".join(f"{n}\t{c}\n" for n, c in classes.items()))
    return root


def write_fsc147_s(fsc_root: Path, entries: dict[str, tuple[str, int]]) -> Path:
    """FSC-147-S-v2.json beside an FSC-147 root: {image: {"class": ..., "count": ...}}."""
    path = fsc_root / "FSC-147-S-v2.json"
    path.write_text(json.dumps({name: {"class": cls, "count": count} for name, (cls, count) in entries.items()}))
    return path


def write_carpk(root: Path, count: int = 2, height: int = 64, width: int = 112, seed: int = 0) -> Path:
    """CARPK as published: ImageSets/test.txt, Images/<name>.png, Annotations/<name>.txt (x1 y1 x2 y2 1)."""
    rng = np.random.default_rng(seed)
    for folder in ("ImageSets", "Images", "Annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        stem = f"20161225_TPZ_{i + 1:05d}"
        centres = random_points(rng, int(rng.integers(1, 6)), height, width, margin=4.0)
        Image.fromarray(draw_objects(height, width, centres, COLOURS["cars"], seed + i)).save(root / "Images" / f"{stem}.png")
        lines = "".join(f"{x - 3:.0f} {y - 3:.0f} {x + 3:.0f} {y + 3:.0f} 1\n" for x, y in centres)
        (root / "Annotations" / f"{stem}.txt").write_text(lines)
        names.append(stem)
    (root / "ImageSets" / "test.txt").write_text("\n".join(names) + "\n")
    return root


def write_shanghaitech(root: Path, part: str = "A", shapes: dict[str, tuple[int, int, int]] | None = None,
                       seed: int = 0) -> Path:
    """ShanghaiTech part_<part>/test_data/{images/IMG_k.jpg, ground-truth/GT_IMG_k.mat}, points at
    image_info[0][0][0][0][0]. `shapes`: {stem: (height, width, people)}; one portrait by default."""
    shapes = shapes or {"IMG_1": (64, 96, 4), "IMG_2": (96, 64, 2)}
    rng = np.random.default_rng(seed)
    data = root / f"part_{part}" / "test_data"
    (data / "images").mkdir(parents=True, exist_ok=True)
    (data / "ground-truth").mkdir(parents=True, exist_ok=True)
    for i, (stem, (height, width, people)) in enumerate(shapes.items()):
        points = random_points(rng, people, height, width)
        Image.fromarray(draw_objects(height, width, points, (220, 220, 220), seed + i)).save(data / "images" / f"{stem}.jpg")
        struct = np.zeros((1, 1), dtype=[("location", "O"), ("number", "O")])
        struct[0, 0]["location"] = points.astype(np.float64).reshape(-1, 2)
        struct[0, 0]["number"] = np.array([[len(points)]], dtype=np.float64)
        cell = np.empty((1, 1), dtype=object)
        cell[0, 0] = struct
        scipy.io.savemat(str(data / "ground-truth" / f"GT_{stem}.mat"), {"image_info": cell})
    return root
