"""Write synthetic scenes to disk in the exact FSC-147 layout, so every FSC-147 tool reads them.

    OUT/images_384_VarV2/<split>_<index>.jpg   JPEG, quality 95, no chroma subsampling
    OUT/annotation_FSC147_384.json             {file: {"points", "box_examples_coordinates", "H",
                                                "W", "ratio_h", "ratio_w", "synthetic"}}
    OUT/Train_Test_Val_FSC_147.json            {"train", "val", "test", "val_coco", "test_coco"}
    OUT/ImageClasses_FSC147.txt                file<TAB>prompt ("red triangles")

As in FSC-147 each image has one prompted class; its points are the centres of the objects the
prompt refers to and its three example boxes are boxes of three of those objects (repeated when
fewer than three exist). The extra "synthetic" entry records how the image was made (kind, class,
seed). Image i of a split is generated from the seed sequence (seed, i, split), so any image can be
regenerated alone and the result does not depend on the number of workers.

Writing a split into a folder that already holds other splits merges with them; writing a split
again replaces that split (its old images are removed). Metadata files are replaced atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipcount.errors import ConfigError, DataError
from clipcount.synthetic.prompts import parse_prompt
from clipcount.synthetic.world import (
    TEST_KINDS,
    Scene,
    WorldConfig,
    make_test_example,
    sample_training_example,
)

ANNOTATIONS = "annotation_FSC147_384.json"
SPLIT_FILE = "Train_Test_Val_FSC_147.json"
CLASS_FILE = "ImageClasses_FSC147.txt"
IMAGE_DIR = "images_384_VarV2"
STANDARD_SPLITS = ("train", "val", "test", "val_coco", "test_coco")
KINDS = ("train",) + TEST_KINDS + ("mixed",)
JPEG_QUALITY = 95


@dataclass
class WrittenSplit:
    """What make_dataset wrote."""

    root: Path
    split: str
    files: list[str]
    counts: list[int]  # ground-truth count of each file, aligned with `files`


@dataclass
class _Task:
    root: str
    split: str
    index: int
    seed: int
    kind: str
    cfg: dict[str, Any]


# ---- one image ----------------------------------------------------------------------------------

def image_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.jpg"


def image_rng(seed: int, index: int, split: str) -> np.random.Generator:
    """The generator of image `index` of `split`; independent of every other image."""
    return np.random.default_rng(np.random.SeedSequence([seed, index, zlib.crc32(split.encode())]))


def kind_of(kind: str, index: int) -> str:
    """"mixed" cycles held_out, fidelity, seen by index; other kinds are themselves."""
    return TEST_KINDS[index % len(TEST_KINDS)] if kind == "mixed" else kind


def example_for(rng: np.random.Generator, kind: str, cfg: WorldConfig) -> tuple[Scene, str]:
    """A scene and its prompt; the prompted class always has at least one object."""
    for _ in range(10):
        if kind == "train":
            scene, prompt = sample_training_example(rng, cfg.replace(absent_prompt_prob=0.0))
        else:
            scene, prompt = make_test_example(rng, kind, cfg)
        if scene.count(prompt) > 0:
            return scene, prompt
    raise RuntimeError(f"could not make a {kind} scene with the prompted class present in 10 tries")


def _corners(box: np.ndarray) -> list[list[float]]:
    """x1, y1, x2, y2 -> FSC-147's [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]."""
    x1, y1, x2, y2 = (round(float(v), 2) for v in box)
    return [[x1, y1], [x1, y2], [x2, y2], [x2, y1]]


def annotation_for(scene: Scene, prompt: str, rng: np.random.Generator) -> dict[str, Any]:
    """The FSC-147 annotation entry of a scene for one prompt."""
    colour, shape = parse_prompt(prompt)
    points = scene.points(colour=colour, shape=shape)  # (N, 2)
    boxes = scene.boxes(colour=colour, shape=shape)  # (N, 4)
    picks = rng.permutation(len(boxes))[:3] if len(boxes) else np.zeros(0, dtype=np.intp)
    picks = np.resize(picks, 3) if len(picks) else picks  # repeat when fewer than 3 objects
    return {
        "points": [[round(float(x), 2), round(float(y), 2)] for x, y in points],
        "box_examples_coordinates": [_corners(boxes[i]) for i in picks],
        "H": scene.height,
        "W": scene.width,
        "ratio_h": 1.0,
        "ratio_w": 1.0,
    }


def _write_one(task: _Task) -> tuple[str, dict[str, Any], str]:
    """Generate and save image `task.index`; returns (file name, annotation entry, prompt)."""
    cfg = WorldConfig(**task.cfg)
    kind = kind_of(task.kind, task.index)
    rng = image_rng(task.seed, task.index, task.split)
    scene, prompt = example_for(rng, kind, cfg)
    entry = annotation_for(scene, prompt, rng)
    colour, shape = parse_prompt(prompt)
    entry["synthetic"] = {
        "kind": kind,
        "colour": colour,
        "shape": shape,
        "seed": [task.seed, task.index, task.split],
    }
    name = image_name(task.split, task.index)
    path = Path(task.root) / IMAGE_DIR / name
    Image.fromarray(scene.image).save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return name, entry, prompt


# ---- metadata files -------------------------------------------------------------------------------

def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); delete it or write to an empty folder") from None


def _read_classes(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    classes: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, prompt = line.partition("\t")
        if not sep:
            raise DataError(f"{path} line {lineno} has no tab; delete the file or write to an empty folder")
        classes[name.strip()] = prompt.strip()
    return classes


def _replace_file(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then atomically rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _folder_lock(root: Path) -> Iterator[None]:
    """Serialise metadata merges of processes writing splits into the same folder (POSIX only;
    elsewhere concurrent writers to one folder may lose a split)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(root / ".synthetic.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _merge_metadata(root: Path, split: str, results: list[tuple[str, dict[str, Any], str]]) -> None:
    """Fold one split's results into the folder's three metadata files."""
    with _folder_lock(root):
        _merge_locked(root, split, results)


def _merge_locked(root: Path, split: str, results: list[tuple[str, dict[str, Any], str]]) -> None:
    annotations: dict[str, Any] = _read_json(root / ANNOTATIONS, {})
    splits: dict[str, list[str]] = _read_json(root / SPLIT_FILE, {})
    classes = _read_classes(root / CLASS_FILE)
    if not isinstance(annotations, dict) or not isinstance(splits, dict):
        raise DataError(f"{root} holds FSC-147 metadata of an unexpected shape; write to an empty folder")

    new_names = [name for name, _, _ in results]
    kept_elsewhere = {n for s, names in splits.items() if s != split for n in names}
    for stale in set(splits.get(split, [])) - set(new_names) - kept_elsewhere:
        annotations.pop(stale, None)
        classes.pop(stale, None)
        (root / IMAGE_DIR / stale).unlink(missing_ok=True)
    for name, entry, prompt in results:
        annotations[name] = entry
        classes[name] = prompt
    splits[split] = new_names
    for s in STANDARD_SPLITS:  # readers expect every FSC-147 key
        splits.setdefault(s, [])

    _replace_file(root / ANNOTATIONS, json.dumps(annotations, separators=(",", ":")))
    _replace_file(root / SPLIT_FILE, json.dumps(splits, indent=1))
    _replace_file(root / CLASS_FILE, "".join(f"{n}\t{p}\n" for n, p in classes.items()))


# ---- the dataset ---------------------------------------------------------------------------------

def _check_args(split: str, n: int, seed: int, mode: str, kind: str | None) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split or ""):
        raise ConfigError(f"split name {split!r} must be letters, digits, '_' or '-' (e.g. train, val, test)")
    if n < 0:
        raise ConfigError(f"number of images must be >= 0, got {n}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if mode not in ("train", "test"):
        raise ConfigError(f"mode must be 'train' or 'test', got {mode!r}")
    if kind is None:
        kind = "train" if mode == "train" else "mixed"
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if mode == "train" and kind != "train":
        raise ConfigError(f"kind {kind!r} makes test scenes; pass mode='test'")
    if mode == "test" and kind == "train":
        raise ConfigError("kind 'train' needs mode='train'")
    return kind


def make_dataset(
    out_dir: str | Path,
    split: str,
    n: int,
    seed: int,
    mode: str = "train",
    cfg: WorldConfig | None = None,
    workers: int = 1,
    kind: str | None = None,
    progress: bool = True,
) -> WrittenSplit:
    """Write `n` synthetic images as split `split` of an FSC-147-format dataset in `out_dir`.

    mode "train" draws training classes only, prompts in every wording. mode "test" makes
    "<colour> <shape>" prompted test scenes of `kind`: "held_out", "fidelity", "seen", or "mixed"
    (the default: the three in turn). `cfg` sets the world (its mode is replaced by `mode`).
    Split names other than train/val/test/val_coco/test_coco are written too, but FSC-147
    readers only know those five: put other benchmarks in their own folder.

    workers > 1 uses "spawn" processes, which re-import the calling script: call this from under
    `if __name__ == "__main__":` there (the `clipcount` command does).
    """
    kind = _check_args(split, n, seed, mode, kind)
    cfg = (cfg or WorldConfig()).replace(mode=mode)
    root = Path(out_dir)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    tasks = [_Task(str(root), split, i, seed, kind, asdict(cfg)) for i in range(n)]

    results: list[tuple[str, dict[str, Any], str]] = []
    bar = tqdm(total=n, desc=f"synthetic {split}", unit="img", disable=not progress)
    try:
        for result in _run(tasks, workers):
            results.append(result)
            bar.update(1)
    finally:
        bar.close()
    _merge_metadata(root, split, results)
    return WrittenSplit(
        root=root,
        split=split,
        files=[name for name, _, _ in results],
        counts=[len(entry["points"]) for _, entry, _ in results],
    )


def _run(tasks: list[_Task], workers: int) -> Iterable[tuple[str, dict[str, Any], str]]:
    """Results in task order, from this process or a pool of `workers` processes."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_write_one, tasks)
        return
    # "spawn": forking a process that may hold torch/BLAS threads can deadlock the children.
    context = multiprocessing.get_context("spawn")
    chunk = max(1, min(16, len(tasks) // (4 * workers)))
    with context.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_write_one, tasks, chunksize=chunk)


# ---- command line ----------------------------------------------------------------------------

def add_cli(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register `synthetic make-dataset` on the main CLI's subparsers. Each leaf parser sets
    `func(args) -> int` (the exit status). Returns the `synthetic` command's own subparsers, so
    more `clipcount synthetic ...` commands can be added next to make-dataset."""
    parser = subparsers.add_parser("synthetic", help="the procedural counting world (datasets for training and tests)")
    sub = parser.add_subparsers(dest="synthetic_command", metavar="COMMAND", required=True)
    make = sub.add_parser(
        "make-dataset",
        help="write synthetic images in the FSC-147 file layout",
        description="Write N synthetic images as one split of an FSC-147-format dataset in OUT "
        "(other splits already in OUT are kept).",
    )
    make.add_argument("out", metavar="OUT", type=Path, help="dataset folder (created if missing)")
    make.add_argument("--split", default="train", help="split name (train, val, test, ...); default train")
    make.add_argument("--n", type=int, required=True, help="number of images")
    make.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    make.add_argument("--mode", choices=("train", "test"), default="train",
                      help="train: training classes only; test: test scenes (default train)")
    make.add_argument("--kind", choices=KINDS[1:], default=None,
                      help="test scene kind (default mixed: held_out, fidelity, seen in turn)")
    make.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    make.add_argument("--min-width", type=int, default=WorldConfig.min_width, help="narrowest image")
    make.add_argument("--max-width", type=int, default=WorldConfig.max_width, help="widest image")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(func=run_make_dataset)
    return sub


def run_make_dataset(args: argparse.Namespace) -> int:
    cfg = WorldConfig(min_width=args.min_width, max_width=args.max_width, mode=args.mode)
    written = make_dataset(
        args.out, args.split, args.n, args.seed, mode=args.mode, cfg=cfg, workers=args.workers,
        kind=args.kind, progress=not args.quiet,
    )
    counts = np.asarray(written.counts) if written.counts else np.zeros(1)
    print(
        f"wrote {len(written.files)} images to {written.root / IMAGE_DIR} as split {written.split!r} "
        f"(count mean {counts.mean():.1f}, min {int(counts.min())}, max {int(counts.max())})"
    )
    return 0
