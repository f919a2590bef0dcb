"""The Python API: count things in images by describing them.

    from clipcount.api import Counter
    counter = Counter.from_pretrained("demo")               # or a checkpoint folder / hub id
    result = counter.count("orchard.jpg", "apples")          # one prompt -> one CountResult
    result.count, result.density, result.points              # float, (H, W), (K, 2) x, y
    apples, pears = counter.count("orchard.jpg", ["apples", "pears"])   # image encoded once

`Counter` wraps the engine's DensityPredictor (sliding windows, batched, text cache) and adds what
people need around it: images of any kind and size (imaging.load_image), prompts checked with a
clear message, densities and points brought back to the image's own pixel grid, and a lazy
`count_many` for folders of thousands of images.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clipcount.engine.inference import DensityPredictor
from clipcount.engine.locations import find_objects
from clipcount.engine.windows import resize_density
from clipcount.errors import ClipCountError, ConfigError, PromptError
from clipcount.imaging import ImageLimits, ImageSource, load_image_sized
from clipcount.modeling.clip_count import ClipCount
from clipcount.models import DEFAULT_MODEL, is_synthetic_only, resolve_model, warn_if_demo

PRECISIONS = ("auto", "fp32", "bf16")
_PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16"}

# Columns of a results table (CLI --csv, the web page's download); JSON rows add "points".
ROW_FIELDS = ("image", "prompt", "count", "objects", "width", "height", "error")


@dataclass
class CountResult:
    """One prompt counted in one image. Everything is in the image's own pixel grid."""

    prompt: str
    count: float  # density.sum() / density_scale, floored at 0
    density: np.ndarray = field(repr=False)  # (H, W) float32, objects per pixel * density_scale
    points: np.ndarray = field(repr=False)  # (K, 2) float (x, y), pixel centres at integers; K = round(count)
    # (height, width) of the image file (upright). Points are in this grid too. The density is on
    # the grid the image was counted at: the same, except for images larger than
    # ImageLimits.max_side_for_counting (4096 px by default), which are downscaled for counting.
    image_size: tuple[int, int]

    @property
    def downscaled(self) -> bool:
        """Whether the image was counted at a smaller size than its own (density.shape < image_size)."""
        return tuple(self.density.shape[:2]) != tuple(self.image_size)

    def points_on_density(self) -> np.ndarray:
        """The points (K, 2) in the density's grid, e.g. for drawing them on the counted image."""
        height, width = self.image_size
        scale = np.array([self.density.shape[1] / width, self.density.shape[0] / height])
        return (self.points + 0.5) * scale - 0.5

    def to_row(self, image: str) -> dict[str, Any]:
        """A table row: the ROW_FIELDS plus "points" ([[x, y], ...], rounded to 0.1 px)."""
        height, width = self.image_size
        return {
            "image": image, "prompt": self.prompt, "count": _finite_or_none(self.count),
            "objects": int(len(self.points)), "width": width, "height": height, "error": "",
            "points": np.round(self.points, 1).tolist(),
        }


@dataclass
class ImageCount:
    """One image of `count_many`: its results, or the reason it could not be counted."""

    source: Any = field(repr=False)  # what was given: a path, PIL image, array ...
    results: list[CountResult] = field(default_factory=list)  # one per prompt; empty when `error` is set
    error: str | None = None  # one line for people, naming the image
    image: np.ndarray | None = field(default=None, repr=False)  # (H, W, 3) float32 as counted, for overlays

    @property
    def downscaled(self) -> bool:
        """Whether the image was counted smaller than its own size (results are in its own size)."""
        return any(result.downscaled for result in self.results)

    @property
    def name(self) -> str:
        return source_name(self.source)

    def __repr__(self) -> str:
        return f"ImageCount({self.name!r}, results={self.results!r}, error={self.error!r})"

    def to_rows(self, prompts: Sequence[str]) -> list[dict[str, Any]]:
        """One row per prompt; an image that failed gets an error row for each prompt."""
        if self.error is not None:
            return [error_row(self.name, prompt, self.error) for prompt in prompts]
        return [result.to_row(self.name) for result in self.results]


def error_row(image: str, prompt: str, error: str) -> dict[str, Any]:
    return {"image": image, "prompt": prompt, "count": None, "objects": None, "width": None,
            "height": None, "error": error, "points": []}


def source_name(source: Any) -> str:
    """How an image is called in results and messages: its path, or its kind."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{type(source).__name__}>"


class PromptCutWarning(UserWarning):
    """A prompt is longer than CLIP's text context; only its first words are read."""


class Counter:
    """Counts what prompts describe in images, with one model on one device.

    Device and precision are chosen automatically (a CUDA GPU with bfloat16 if there is one, else
    the CPU in float32, where a CPU with native bf16 runs the heaviest matmuls in bf16: counts within
    0.5% of float32, see benchmarks/precision.py) and can be forced with `device="cpu"`,
    `precision="fp32"` and so on.
    """

    def __init__(
        self,
        model: ClipCount,
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        stride: int | None = None,
        max_batch: int = 64,
        limits: ImageLimits = ImageLimits(),
        min_distance: int = 3,
        windowing: str | None = None,
    ):
        """stride: pixels between windows (default a third of the window, the published protocol's
        128 for 384); min_distance: pixels between object points in the model's grid (images
        resized to its image height, 384 for the published model);
        windowing: "clipcount" or "published" (default: what the model's config says; converted
        published checkpoints say "published")."""
        precision = _check_precision(precision)
        device = _check_device(device)
        window = model.config.window_size
        stride = max(1, window // 3) if stride is None else stride
        if not 0 < stride <= window:
            raise ConfigError(f"stride must be between 1 and the model's window size {window}, not {stride}")
        check_windowing(windowing or model.config.windowing, stride, window, model.config.resize_height)
        self.predictor = DensityPredictor(model, stride=stride, max_batch=max_batch, device=device,
                                          precision=precision, windowing=windowing)
        self.limits = limits
        self.min_distance = min_distance
        self.synthetic_only = False  # set by from_pretrained for the demo model: not for real photos
        self.source: str | None = None

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = DEFAULT_MODEL, **options: Any) -> "Counter":
        """Load a model by name ("demo"), checkpoint folder or file, or Hugging Face hub id.

        Options are those of `Counter(...)`. The demo model warns once per process
        (DemoModelWarning) that it was trained on synthetic shapes only.
        """
        from clipcount.modeling.checkpoint import load_model

        folder = resolve_model(source)
        counter = cls(load_model(folder), **options)
        counter.source = os.fspath(source)
        counter.synthetic_only = is_synthetic_only(source)
        warn_if_demo(source, stacklevel=3)
        return counter

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def precision(self) -> str:
        """bf16 where any of the model runs in bf16 (autocast, or `auto`'s bf16 matmuls on a CPU), else fp32."""
        low = self.predictor.autocast_dtype is not None or self.predictor.bf16_modules
        return "bf16" if low else "fp32"

    @property
    def density_scale(self) -> float:
        return self.predictor.density_scale

    def count(self, image: ImageSource, prompts: str | Sequence[str]) -> CountResult | list[CountResult]:
        """Count in one image (path, bytes, PIL image or (H, W[, C]) array).

        One prompt (a string) gives one CountResult; a list gives a list, in the same order, and
        the image is encoded only once for all of them. Raises ImageError / PromptError.
        """
        prompt_list = check_prompt_list(prompts)
        self._warn_cut(prompt_list)
        pixels, size = load_image_sized(image, self.limits)  # (H, W, 3) float32 in [0, 1]; original (H, W)
        results = self.count_loaded(pixels, prompt_list, size)
        return results[0] if isinstance(prompts, str) else results

    def count_many(self, images: Iterable[ImageSource], prompts: str | Sequence[str]) -> Iterator[ImageCount]:
        """Count the same prompts in many images, lazily: one ImageCount per image, in order.

        Only the image being counted and the next one (decoded in a background thread meanwhile)
        are in memory. An image that cannot be read gives an ImageCount with `error` set instead
        of stopping the run; bad prompts raise PromptError before anything is read.
        """
        prompt_list = check_prompt_list(prompts)
        self._warn_cut(prompt_list)
        self.predictor.encode_prompts(prompt_list)  # once, up front: the cache serves every image
        for source, loaded, error in _prefetched(images, self._try_load):
            if error is not None:
                yield ImageCount(source, [], error)
            else:
                pixels, size = loaded
                yield ImageCount(source, self.count_loaded(pixels, prompt_list, size), None, pixels)

    def cut_prompts(self, prompts: Sequence[str]) -> dict[str, str]:
        """Prompts too long for CLIP's text context -> the words of each that are read."""
        model = self.predictor.model
        cuts = {prompt: model.prompt_cut(prompt) for prompt in prompts}
        return {prompt: kept for prompt, kept in cuts.items() if kept is not None}

    def _warn_cut(self, prompts: Sequence[str]) -> None:
        for prompt, kept in self.cut_prompts(prompts).items():
            warnings.warn(prompt_cut_message(prompt, kept), PromptCutWarning, stacklevel=3)

    def count_loaded(self, pixels: np.ndarray, prompts: Sequence[str],
                     original_size: tuple[int, int] | None = None) -> list[CountResult]:
        """An image as load_image returns it, (H, W, 3) float32 in [0, 1] -> one result per prompt.

        original_size: (height, width) of the file it was loaded from when load_image downscaled
        it; points and image_size are reported in that grid (default: the pixels' own)."""
        image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)  # (3, H, W)
        densities = self.predictor.predict(image, list(prompts))  # each (H', W') at the model's image height, on the CPU
        counted = (int(pixels.shape[0]), int(pixels.shape[1]))
        size = counted if original_size is None else (int(original_size[0]), int(original_size[1]))
        return [self._result(prompt, density, counted, size) for prompt, density in zip(prompts, densities)]

    def _result(self, prompt: str, density: torch.Tensor, counted: tuple[int, int],
                size: tuple[int, int]) -> CountResult:
        """Model-grid density (h, w) -> a CountResult: density on the counted grid (H', W'),
        points on the original grid `size` = (H, W)."""
        count = self.predictor.count(density)
        points = find_objects(density, count, self.density_scale, self.min_distance)  # (K, 2) in (h, w) grid
        height, width = size
        scale = np.array([width / density.shape[-1], height / density.shape[-2]])
        points = (points + 0.5) * scale - 0.5  # pixel centres map to pixel centres
        full = resize_density(density, *counted).numpy()  # (H', W'), same sum
        return CountResult(prompt, count, full.astype(np.float32, copy=False), points, size)

    def _try_load(self, source: ImageSource) -> tuple[tuple[np.ndarray, tuple[int, int]] | None, str | None]:
        try:
            return load_image_sized(source, self.limits), None
        except ClipCountError as error:
            return None, str(error)


def prompt_cut_message(prompt: str, kept: str) -> str:
    shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
    return (f"prompt {shown!r} ({len(prompt)} characters) is longer than CLIP reads; "
            f"only its first {len(kept.split())} words are used: {kept[:60]!r}{'...' if len(kept) > 60 else ''}")


def check_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or many -> a non-empty list of stripped prompts; PromptError names a bad one."""
    prompt_list = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompt_list, Sequence) or isinstance(prompt_list, (bytes, bytearray)):
        raise PromptError(f"prompts must be a string or a list of strings, not {type(prompts).__name__}")
    if len(prompt_list) == 0:
        raise PromptError("no prompt given; say what to count, e.g. 'apples'")
    cleaned = []
    for prompt in prompt_list:
        if not isinstance(prompt, str):
            raise PromptError(f"prompt {prompt!r} is not text; prompts are strings such as 'apples'")
        if not prompt.strip():
            raise PromptError(f"prompt {prompt!r} is empty; say what to count, e.g. 'apples'")
        cleaned.append(" ".join(prompt.split()))  # newlines, tabs and runs of spaces -> one space
    return cleaned


PROMPT_SEPARATORS = ",;\n"  # where the command line and the web page split what people type


def split_prompts(texts: str | Sequence[str]) -> list[str]:
    """What people typed -> the prompts to count: the one rule of `clipcount count -p` and the web page.

    Each text (one -p, or the page's box) is split at commas, semicolons and new lines ("apples, red
    cars" is two prompts); parts are trimmed and empty parts dropped, but a text with no prompt at all
    is an error (an empty -p is a mistake, not a wish). A prompt given twice (ignoring case, as CLIP's
    tokenizer does) is counted once, in the order first given. So a prompt cannot contain a comma.
    """
    pieces = [texts] if isinstance(texts, str) else texts
    if isinstance(pieces, (bytes, bytearray)) or not isinstance(pieces, Sequence) \
            or not all(isinstance(piece, str) for piece in pieces):
        return check_prompt_list(pieces)  # names what is not text
    check_prompt_list(pieces)  # a list of texts, none of them blank
    unique: dict[str, str] = {}
    for piece in pieces:
        parts = [" ".join(part.split()) for part in re.split(f"[{re.escape(PROMPT_SEPARATORS)}]", piece)]
        if not any(parts):
            raise PromptError(f"prompt {piece!r} is empty; say what to count, e.g. 'apples'")
        for part in filter(None, parts):
            unique.setdefault(part.casefold(), part)
    return list(unique.values())


def _prefetched(
    sources: Iterable[Any], load: Callable[[Any], tuple[Any, str | None]]
) -> Iterator[tuple[Any, Any, str | None]]:
    """(source, pixels, error) per source, in order, the next one loading while this one is used."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipcount-decode") as pool:
        pending: deque[tuple[Any, Future]] = deque()
        for source in sources:
            pending.append((source, pool.submit(load, source)))
            if len(pending) > 1:
                yield _settle(*pending.popleft())
        while pending:
            yield _settle(*pending.popleft())


def _settle(source: Any, future: Future) -> tuple[Any, Any, str | None]:
    pixels, error = future.result()
    return source, pixels, error


def check_windowing(windowing: str, stride: int, window: int, image_height: int | None = None) -> None:
    """ConfigError unless `windowing` is known and works with `stride` (published: stride divides the
    window) and the model's image height (published: one row of windows, so the window's own)."""
    from clipcount.engine.windows import WINDOWINGS

    if windowing not in WINDOWINGS:
        raise ConfigError(f"unknown windowing {windowing!r}; use one of {', '.join(WINDOWINGS)}")
    if windowing == "published" and window % stride:
        raise ConfigError(f"the published windowing needs a stride that divides the window {window} "
                          f"(e.g. {window // 3}), not {stride}; change --stride or use --windowing clipcount")
    if windowing == "published" and image_height not in (None, window):
        raise ConfigError(f"the published windowing cuts one row of windows, but this model resizes images to "
                          f"{image_height} pixels for {window}-pixel windows; use --windowing clipcount")


def _check_precision(precision: str) -> str:
    precision = _PRECISION_ALIASES.get(precision, precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return precision


def _check_device(device: str | torch.device | None) -> torch.device | None:
    """The device asked for, or an error saying why it cannot be used here."""
    if device is None or device == "auto":
        return None
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but no CUDA GPU is available here; use cpu or auto")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return chosen


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


__all__ = ["Counter", "CountResult", "PromptCutWarning", "ImageCount", "ROW_FIELDS", "check_prompt_list", "error_row",
           "source_name", "split_prompts"]
