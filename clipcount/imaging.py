"""Reading the images people really have, and writing files without leaving half-written ones.

`load_image` turns a path, bytes, a PIL image or a numpy array into one canonical form: an
(H, W, 3) float32 array in [0, 1], upright (EXIF orientation applied), RGB, with transparency
composited on white. It refuses, with one clear line, what cannot be counted: missing or non-image
files, images too small to hold anything, and decompression bombs (refused from the header alone,
before any pixel is decoded). Very large images are downscaled: the count does not change, because
the model's density integrates to the count whatever the resolution.

High bit depth: 16-bit and 32-bit integer images are scaled by the range their values actually use,
rounded up to a common sensor bit depth (8, 10, 12, 14, 16 bits, or the maximum beyond that). A
12-bit microscope frame stored in 16 bits thus spans [0, 1] instead of looking black, and nothing is
clipped at 255 (which is what a plain `convert("RGB")` does to such images).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import secrets
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipcount.errors import ConfigError, ImageError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, bytes, bytearray, memoryview]

# File name endings `list_images` treats as images when it expands folders and patterns.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga"}
)

# Integer images are scaled by the smallest of these full-scale values that covers their maximum.
_BIT_DEPTH_RANGES = tuple(float(2**bits - 1) for bits in (8, 10, 12, 14, 16))
_FLOAT_TOLERANCE = 1e-3  # float arrays may overshoot [0, 1] by resampling noise this small
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image by 90 degrees


@dataclass(frozen=True)
class ImageLimits:
    """What `load_image` accepts.

    min_side: images narrower or shorter than this many pixels are refused (nothing to count).
    max_pixels: images with more pixels than this are refused before decoding (decompression bombs).
        The default takes the 108 MP and 200 MP photos phone cameras write. Pillow's own global
        guard (twice `Image.MAX_IMAGE_PIXELS`, ~179 MP) refuses bigger files at opening; the CLI's
        --max-pixels raises it to match, a Python caller going beyond it must raise it too.
    max_side_for_counting: images whose longer side exceeds this are downscaled to it, aspect kept
        (decoded at 1/2, 1/4 or 1/8 scale already where the format allows, so a 108 MP JPEG never
        exists in memory at full size). Results are still reported in the original pixel grid.
    """

    min_side: int = 32
    max_pixels: int = 178_000_000
    max_side_for_counting: int = 4096

    def __post_init__(self) -> None:
        for name in ("min_side", "max_pixels", "max_side_for_counting"):
            if getattr(self, name) < 1:
                raise ImageError(f"ImageLimits.{name} must be a positive number, not {getattr(self, name)}")
        if self.max_side_for_counting < self.min_side:
            raise ImageError("ImageLimits.max_side_for_counting must be at least min_side")


# ---- loading -----------------------------------------------------------------------------------

def load_image(source: ImageSource, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Any supported image -> (H, W, 3) float32 in [0, 1], upright, RGB on a white background.

    `source` is a file path, the bytes of an image file, a PIL image (left unchanged) or a numpy
    array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) holding uint8, uint16 or [0, 1] floats.
    Raises ImageError naming the image and what to do when it cannot be used.
    """
    return load_image_sized(source, limits)[0]


def load_image_sized(source: ImageSource, limits: ImageLimits = ImageLimits()) -> tuple[np.ndarray, tuple[int, int]]:
    """`load_image`, and the (height, width) of the upright original: larger than the pixels'
    own shape when the image was downscaled for counting (ImageLimits.max_side_for_counting)."""
    if isinstance(source, np.ndarray):
        return _load_array(source, "the array", limits), _array_size(source)
    if isinstance(source, Image.Image):
        _check_size(source.size, "the PIL image", limits)
        with _decoding_errors("the PIL image"):
            size = _upright_size(source, "the PIL image")
            return _finish_pil(source, "the PIL image", limits), size
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("the image bytes are empty (0 bytes); pass the contents of an image file")
        return _load_file(io.BytesIO(bytes(source)), "the image bytes", limits)
    if isinstance(source, (str, os.PathLike)):
        path = _existing_file(source)
        return _load_file(path, str(path), limits)
    raise ImageError(
        f"cannot read an image from a {type(source).__name__}; pass a file path, bytes, "
        "a PIL image or a numpy array"
    )


def _existing_file(source: str | os.PathLike) -> Path:
    """The path as a readable file, or an ImageError that says what is wrong with it."""
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.startswith(("http://", "https://")):
        raise ImageError(f"{text}: web addresses are not fetched; download the image and pass its file path")
    path = Path(text).expanduser()
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image; pass the image files inside it")
    if not path.exists():
        raise ImageError(f"{path}: no such file; check the path")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: permission denied; make the file readable")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes); it holds no image, copy or export it again")
    return path


def _load_file(file: Path | IO[bytes], name: str, limits: ImageLimits) -> tuple[np.ndarray, tuple[int, int]]:
    """Open lazily, check the header's size, then decode (scaled down already where JPEG allows)."""
    with _decoding_errors(name):
        # Pillow warns (and refuses at twice its limit) about large images; our own size check is
        # the one that decides, so its warning is silenced for this call only.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                _check_size(img.size, name, limits)
                size = _upright_size(img, name)  # from the header, before draft shrinks img.size
                _draft_smaller(img, limits)
                img.load()
                return _finish_pil(img, name, limits), size


def _upright_size(img: Image.Image, name: str) -> tuple[int, int]:
    """(height, width) of the image once its EXIF orientation is applied."""
    width, height = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: _upright keeps the image as stored
        orientation = 1
    return (width, height) if orientation in _SWAPPING_ORIENTATIONS else (height, width)


def _array_size(array: np.ndarray) -> tuple[int, int]:
    return int(array.shape[0]), int(array.shape[1])


@contextlib.contextmanager
def _decoding_errors(name: str) -> Iterator[None]:
    """Turn Pillow's many decoding failures into one ImageError line naming the image."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        # Pillow's guard fires at opening, before our own check: its message holds the size.
        found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(error))
        size = f"has {int(found.group(1)):,} pixels, more than the {int(found.group(2)):,} " if found else "has more pixels than "
        raise ImageError(
            f"{name} {size}Pillow opens safely (a possible decompression bomb); downscale it first, "
            "or raise the limit (--max-pixels, ImageLimits.max_pixels) if you trust the file"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image Pillow can read; convert it to JPEG or PNG") from None
    except MemoryError:
        raise ImageError(f"{name} is too large to decode in memory; downscale it first") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
        raise ImageError(f"{name} is corrupt or truncated ({exc}); re-export or re-download it") from None


def _check_size(size: tuple[int, int], name: str, limits: ImageLimits) -> None:
    """Refuse images too small to count in, or so large they are likely decompression bombs."""
    width, height = size
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{name} has {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{limits.max_pixels:,}; downscale it first, or raise the limit (--max-pixels, "
            "ImageLimits.max_pixels) if you trust the file"
        )
    if min(width, height) < limits.min_side:
        raise ImageError(
            f"{name} is {width}x{height} pixels; images need at least {limits.min_side} pixels on each side"
        )


def _target_size(width: int, height: int, limits: ImageLimits) -> tuple[int, int]:
    """Size after downscaling: longer side at most max_side_for_counting, shorter side not below min_side."""
    scale = limits.max_side_for_counting / max(width, height)
    scale = max(scale, limits.min_side / min(width, height))  # extreme panoramas keep a usable height
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _draft_smaller(img: Image.Image, limits: ImageLimits) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale when the image will be downscaled anyway (much faster)."""
    target = _target_size(*img.size, limits)
    if target != img.size:
        img.draft(None, target)  # a no-op for formats other than JPEG; never goes below `target`


def _finish_pil(img: Image.Image, name: str, limits: ImageLimits) -> np.ndarray:
    """A decoded PIL image (any mode) -> upright, RGB, downscaled, as float32 (H, W, 3) in [0, 1]."""
    img = _upright(img, name)
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        gray = _unit_float_from_high_bit_depth(np.asarray(img), name)  # (H, W)
        return _finish_float(np.repeat(gray[:, :, None], 3, axis=2), limits)
    try:
        if _has_alpha(img):
            rgb = _composite_on_white(img)
        else:
            rgb = img if img.mode == "RGB" else img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: colour mode {img.mode} cannot be converted to RGB ({exc})") from None
    target = _target_size(*rgb.size, limits)
    if target != rgb.size:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.float32) / np.float32(255.0)


def _upright(img: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation; a damaged EXIF block costs the rotation, not the image."""
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return img  # upright already; skip exif_transpose's full copy
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - metadata parsers raise many types; the pixels are fine
        warnings.warn(f"{name}: ignoring unreadable EXIF orientation ({exc})", stacklevel=3)
        return img


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Transparent pixels show the white page behind them, as viewers display them."""
    rgba = img.convert("RGBA")  # also resolves palette / colour-key transparency
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _unit_float_from_high_bit_depth(values: np.ndarray, name: str) -> np.ndarray:
    """16/32-bit integer or float pixels (H, W) -> float32 in [0, 1] without clipping detail away."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return values.astype(np.float32)  # already unit-range floats
    if low < 0.0:
        # Signed data (e.g. float or 32-bit scientific images): stretch what is there.
        span = high - low
        return ((values - low) / span if span > 0 else np.zeros_like(values)).astype(np.float32)
    return (values / _full_scale(high)).astype(np.float32)


def _full_scale(high: float) -> float:
    """The full-scale value of the bit depth these values were most likely recorded at."""
    for full in _BIT_DEPTH_RANGES:
        if high <= full:
            return full
    return high


def _finish_float(rgb: np.ndarray, limits: ImageLimits) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> downscaled if needed, float32, contiguous."""
    height, width = rgb.shape[:2]
    target = _target_size(width, height, limits)
    if target != (width, height):
        channels = [
            np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, c], dtype=np.float32), mode="F")
                       .resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0))
            for c in range(3)
        ]
        rgb = np.stack(channels, axis=2)
    return np.ascontiguousarray(np.clip(rgb, 0.0, 1.0), dtype=np.float32)


def _load_array(array: np.ndarray, name: str, limits: ImageLimits) -> np.ndarray:
    """A numpy image (H, W[, C]) -> (H, W, 3) float32 in [0, 1]."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"{name} has shape {tuple(array.shape)}; pass (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) "
            "(channels last: use np.moveaxis(a, 0, -1) for channels-first arrays)"
        )
    height, width = array.shape[:2]
    _check_size((width, height), name, limits)
    if array.dtype == np.uint8:
        # Fast path: composite and downscale at 8 bits in Pillow, converting to float only at the end.
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        pil = Image.fromarray(np.ascontiguousarray(array if array.shape[2] > 1 else array[:, :, 0]),
                              mode=modes[array.shape[2]])
        return _finish_pil(pil, name, limits)
    unit = _unit_float_from_array(array, name)  # (H, W, C)
    if unit.shape[2] == 1:
        unit = np.repeat(unit, 3, axis=2)
    elif unit.shape[2] == 4:
        alpha = unit[:, :, 3:]
        unit = unit[:, :, :3] * alpha + (1.0 - alpha)  # composite on white
    return _finish_float(unit, limits)


def _unit_float_from_array(array: np.ndarray, name: str) -> np.ndarray:
    """uint16 / other integer / bool / float arrays -> float32 in [0, 1]."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and array.min() < 0:
            raise ImageError(f"{name} holds negative integers; pass uint8/uint16 or floats in [0, 1]")
        high = float(array.max()) if array.size else 0.0
        return (array.astype(np.float64) / _full_scale(high)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        unit = array.astype(np.float32)
        if not np.isfinite(unit).all():
            raise ImageError(f"{name} contains NaN or infinite values; replace them before counting")
        low, high = float(unit.min()), float(unit.max())
        if low < -_FLOAT_TOLERANCE or high > 1.0 + _FLOAT_TOLERANCE:
            hint = "divide by 255 first" if high <= 255.0 and low >= 0.0 else "rescale it to [0, 1]"
            raise ImageError(f"{name} holds floats from {low:g} to {high:g}, not in [0, 1]; {hint}")
        return np.clip(unit, 0.0, 1.0)
    raise ImageError(f"{name} has dtype {array.dtype}; pass uint8, uint16 or float values")


# ---- saving ------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path` in one step.

    Readers see either the old file or the complete new one, never a half-written file; on any
    error the temporary file is removed and `path` is untouched. Parent folders are created.
    The file gets the usual permissions (umask applied), not the 0600 of `tempfile`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def check_writable(path: str | os.PathLike, what: str, *, folder: bool = False) -> None:
    """Refuse, before any work, an output that could not be written at the end of it.

    `what` names the output for people (e.g. "--json"); `folder` says whether `path` is to be a
    folder (created if missing) or a file. The test is real: a probe file is created and removed
    in the nearest existing folder, because permission bits do not tell (root, /proc, read-only
    mounts). Nothing is created otherwise; atomic_write makes missing parent folders later.
    """
    target = Path(path).expanduser()
    if target.is_dir() and not folder:
        raise ConfigError(f"{what} {path} is a folder; give a file name, e.g. {Path(path) / 'counts.json'}")
    if target.exists() and not target.is_dir() and folder:
        raise ConfigError(f"{what} {path} is a file, not a folder; give a folder name")
    existing = target if folder else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be written: {existing} is a file, not a folder; choose another place")
    probe = existing / f".clipcount-probe-{secrets.token_hex(6)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as error:
        reason = (error.strerror or type(error).__name__).lower()
        raise ConfigError(f"{what} {path} cannot be written: {existing} takes no new files ({reason}); "
                          "choose another place") from None


def save_image_atomic(image: np.ndarray | Image.Image, path: str | os.PathLike) -> None:
    """Write an image (PIL, or a numpy array as `load_image` returns / uint8) atomically.

    The format follows the file ending (.png, .jpg, ...). Arrays are (H, W), (H, W, 1), (H, W, 3)
    or (H, W, 4), uint8 or floats in [0, 1]. Formats without transparency get the image on white.
    """
    target = Path(path)
    image_format = Image.registered_extensions().get(target.suffix.lower())
    if image_format is None:
        raise ImageError(f"{target}: unknown image file ending {target.suffix!r}; use .png or .jpg")
    pil = image if isinstance(image, Image.Image) else _array_to_pil(image, str(target))
    if image_format in ("JPEG", "BMP") and _has_alpha(pil):
        pil = _composite_on_white(pil)
    elif image_format == "JPEG" and pil.mode not in ("RGB", "L", "CMYK"):
        pil = pil.convert("RGB")
    with atomic_write(target, "wb") as handle:
        pil.save(handle, format=image_format)


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"cannot save an array of shape {tuple(array.shape)} as {name}; pass (H, W[, 3 or 4])")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ImageError(f"cannot save a {array.dtype} array as {name}; pass uint8 or floats in [0, 1]")
        array = np.round(np.clip(np.nan_to_num(array), 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


# ---- finding images ----------------------------------------------------------------------------

def list_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files, folders (recursively) and glob patterns into image paths.

    Returns (paths, errors): paths in the order given, each folder's and pattern's matches sorted,
    duplicates dropped; errors are one-line messages for inputs that matched nothing, for the
    caller to list. A file named explicitly is kept whatever its ending (`load_image` judges it);
    in folders and patterns only image endings count, and hidden files and folders are skipped.
    """
    paths: list[Path] = []
    errors: list[str] = []
    seen: set[Path] = set()
    for item in inputs:
        found, error = _expand_input(item)
        if error:
            errors.append(error)
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths, errors


def _expand_input(item: str) -> tuple[list[Path], str | None]:
    path = Path(item).expanduser()
    if path.is_dir():
        found = _images_in_folder(path)
        return found, None if found else f"{item}: folder holds no images ({_extension_list()})"
    if path.is_file():
        return [path], None
    if any(char in item for char in "*?["):
        found: list[Path] = []
        for match in sorted(glob.glob(os.path.expanduser(item), recursive=True)):
            match_path = Path(match)
            if match_path.is_dir():
                found.extend(_images_in_folder(match_path))
            elif _is_visible_image(match_path):
                found.append(match_path)
        return found, None if found else f"{item}: no images match this pattern"
    return [], f"{item}: no such file or folder"


def _images_in_folder(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders skipped."""
    found = [
        path for path in folder.rglob("*")
        if path.is_file() and _is_visible_image(path)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(found)


def _is_visible_image(path: Path) -> bool:
    # "._photo.jpg" files (macOS metadata) and other dotfiles are not images despite their ending.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _extension_list() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))
