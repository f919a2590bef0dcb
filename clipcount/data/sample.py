"""The record every dataset reader returns, image I/O, and the shared reader machinery.

Coordinate convention (used by every module in `clipcount.data`): a point (x, y) is a continuous
position in pixel units, with the image covering [0, W] x [0, H]; pixel (row r, column c) spans
[c, c + 1) x [r, r + 1) and its centre is (c + 0.5, r + 0.5). This is Pillow's convention for
geometric transforms, so a resize by s maps x -> s * x and a horizontal flip maps x -> W - x
exactly. A point belongs to the pixel (floor(y), floor(x)), clipped into the image so that points
on the right/bottom edge (x == W) still count.

Readers validate every listed image up front (file present, header readable, points inside) so a
bad file fails at construction, naming the file, instead of hours into training. With
`skip_bad=True` a bad item is skipped with a warning and recorded in `.skipped`; nothing is dropped
silently. Pixels are decoded lazily in `__getitem__`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipcount.errors import DataError

# Points at most this far outside the image are rounding noise in annotation tools: clip them.
POINT_TOLERANCE = 1.0

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass
class CountingSample:
    """One image with the objects of one class annotated.

    The ground-truth count is the number of points (never the sum of a density map, which loses
    coincident points). Datasets that only publish counts (FSC-147-S) leave `points` empty and set
    `count_override`.
    """

    image: np.ndarray  # (H, W, 3) float32 in [0, 1]
    points: np.ndarray  # (N, 2) float32, (x, y) in this image's pixel coordinates
    prompt: str  # class name / text prompt
    name: str  # image file name, for reports
    boxes: np.ndarray | None = None  # (K, 4) float32 x1, y1, x2, y2 example boxes
    count_override: int | None = None  # the count when points are unknown

    def __post_init__(self) -> None:
        self.points = as_points(self.points)
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)

    @property
    def count(self) -> int:
        if self.count_override is not None and len(self.points) == 0:
            return int(self.count_override)
        return int(len(self.points))

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def as_points(points: object) -> np.ndarray:
    """Any list/array of (x, y) pairs, possibly empty, as a (N, 2) float32 array."""
    arr = np.asarray(points, dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"points must be (N, 2) (x, y) pairs, got an array of shape {arr.shape}")
    return arr


# ---- image files ------------------------------------------------------------------------------

def load_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file as it is meant to be seen (EXIF rotation applied), RGB.

    Returns (H, W, 3) float32 in [0, 1]. Raises DataError naming the file if it is missing, cannot
    be decoded, or has more than `max_pixels` pixels (checked from the header, before decoding).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise DataError(f"image {path} has {im.width}x{im.height} = {im.width * im.height:,} pixels, "
                                f"more than the limit of {max_pixels:,}; downscale it, or raise --max-pixels")
            im = ImageOps.exif_transpose(im)
            rgb = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file {path} not found; check the dataset root") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is too large to open safely ({exc}); downscale it, or raise --max-pixels") from None
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); replace or remove the file") from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image as `load_image` will return it, from its header only (cheap)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise DataError(f"image file {path} not found; check the dataset root") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); replace or remove the file") from None
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return height, width


def check_points(
    points: np.ndarray, height: int, width: int, where: str, tolerance: float = POINT_TOLERANCE
) -> np.ndarray:
    """Validate annotated points against the image size.

    Points up to `tolerance` pixels outside [0, W] x [0, H] are clipped onto the border; points
    further out (or NaN) raise DataError naming `where` (the annotation file / image).
    """
    points = as_points(points)
    if len(points) == 0:
        return points
    if not np.isfinite(points).all():
        raise DataError(f"{where}: some points are NaN or infinite; fix the annotation")
    x, y = points[:, 0], points[:, 1]
    far = (x < -tolerance) | (x > width + tolerance) | (y < -tolerance) | (y > height + tolerance)
    if far.any():
        worst = points[far][0]
        raise DataError(
            f"{where}: {int(far.sum())} of {len(points)} points lie outside the {width}x{height} image "
            f"(e.g. x={worst[0]:.1f}, y={worst[1]:.1f}); fix the annotation or check that it belongs "
            "to this image"
        )
    clipped = points.copy()
    np.clip(clipped[:, 0], 0.0, float(width), out=clipped[:, 0])
    np.clip(clipped[:, 1], 0.0, float(height), out=clipped[:, 1])
    return clipped


# ---- shared reader machinery ------------------------------------------------------------------

@dataclass
class SampleRecord:
    """Everything about one sample except its pixels (which are decoded on access)."""

    name: str
    image_path: Path
    prompt: str
    points: np.ndarray  # (N, 2) float32, already validated against the image size
    boxes: np.ndarray | None = None  # (K, 4) float32
    count_override: int | None = None

    @property
    def count(self) -> int:
        if self.count_override is not None and len(self.points) == 0:
            return int(self.count_override)
        return int(len(self.points))


class BadItem(Exception):
    """Raised inside a reader for one unusable item; `collect_records` turns it into DataError/skip."""


def collect_records(
    keys: Iterable[str],
    make_record: Callable[[str], SampleRecord | list[SampleRecord]],
    dataset: str,
    skip_bad: bool,
) -> tuple[list[SampleRecord], list[tuple[str, str]]]:
    """Build one or more records per key, raising or skipping (with a warning) on bad items.

    `make_record` raises BadItem (or DataError) with a message that names the file. Returns the
    records and the (key, reason) pairs skipped.
    """
    records: list[SampleRecord] = []
    skipped: list[tuple[str, str]] = []
    for key in keys:
        try:
            made = make_record(key)
        except (BadItem, DataError) as exc:
            reason = str(exc)
            if not skip_bad:
                raise DataError(
                    f"{dataset}: {reason} (--skip-bad, or skip_bad=True in Python, skips such images with a warning)"
                ) from None
            warnings.warn(f"{dataset}: skipping {key}: {reason}", stacklevel=3)
            skipped.append((key, reason))
            continue
        records.extend(made if isinstance(made, list) else [made])
    return records, skipped


class CountingDataset(Sequence[CountingSample]):
    """A list of validated SampleRecords; indexing decodes the image into a CountingSample."""

    dataset_name = "dataset"

    def __init__(self, records: list[SampleRecord], skipped: list[tuple[str, str]] | None = None):
        self.records = records
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self.max_pixels: int | None = None  # images with more pixels are refused unread (eval --max-pixels)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> CountingSample:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"{type(self).__name__} indices must be integers, not {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.load(self.records[int(index)])

    def load(self, record: SampleRecord) -> CountingSample:
        image = load_image(record.image_path, self.max_pixels)
        return CountingSample(
            image=image,
            points=record.points.copy(),
            prompt=record.prompt,
            name=record.name,
            boxes=None if record.boxes is None else record.boxes.copy(),
            count_override=record.count_override,
        )

    @property
    def names(self) -> list[str]:
        """Image file name of each sample (an image annotated for two classes appears twice)."""
        return [r.name for r in self.records]

    @property
    def prompts(self) -> list[str]:
        """Text prompt (class name) of each sample, aligned with `names`."""
        return [r.prompt for r in self.records]

    @property
    def counts(self) -> list[int]:
        """Ground-truth count of each sample, without decoding any image."""
        return [r.count for r in self.records]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} samples, {len(self.skipped)} skipped)"


def require_file(path: Path, what: str, hint: str) -> Path:
    """A dataset-level file that must exist (missing -> DataError, regardless of skip_bad)."""
    if not path.is_file():
        raise DataError(f"{what} {path} not found; {hint}")
    return path


def image_record(
    name: str,
    image_path: Path,
    prompt: str,
    points: object,
    where: str,
    boxes: object | None = None,
    count_override: int | None = None,
    tolerance: float = POINT_TOLERANCE,
) -> SampleRecord:
    """Check the image exists and is readable and the points fit it; return the record.

    Raises BadItem naming the file on any problem.
    """
    if not image_path.is_file():
        raise BadItem(f"image {image_path} is listed but not on disk")
    try:
        height, width = read_image_size(image_path)
        pts = check_points(as_points(points), height, width, where, tolerance)
    except (DataError, ValueError) as exc:
        raise BadItem(str(exc)) from None
    box_arr = None
    if boxes is not None:
        try:
            box_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        except ValueError:
            raise BadItem(f"{where}: boxes must be [x1, y1, x2, y2] lists") from None
    return SampleRecord(name, image_path, prompt, pts, box_arr, count_override)


def sorted_naturally(names: Sequence[str]) -> list[str]:
    """IMG_2 before IMG_10, as people number files."""

    def key(s: str) -> list[object]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]

    return sorted(names, key=key)
