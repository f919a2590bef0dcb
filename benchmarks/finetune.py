"""Fine-tuning on your own images, measured on real ones: does a short fine-tune count held-out images
better than answering the training images' mean count, and does it leave empty background near 0?

The images: the Hubble Deep Field photograph that scikit-image ships inside its wheel
(`skimage.data.hubble_deep_field()`, 872x1000 RGB, NASA/ESA, public domain), cut into square tiles
of different sizes (120 to 436 pixels), so that counts range widely as in real counting sets
(FSC-147: 7 to 3000 per image). Every image is resized to the model's window height, so a big tile
shows more and smaller stars: a model that does not see the stars answers about the same for all. Points: one per light source found by the Laplacian-of-Gaussian blob detector with the
parameters of scikit-image's own blob-detection example (`skimage.feature.blob_log` on the greyscale
image, max_sigma=30, num_sigma=10, threshold=0.1), run once on the whole photograph so sources on a
tile border are not counted twice; a tile holds the points inside it. Six tiles from the left half of the photograph are the
training split, ten from the right half the test split (the points file's `split` column), so no
star is in both.

What runs, each as a person would type it:
    clipcount train --dataset folder --root DATA --init demo --out RUN           (fine-tuning defaults)
    clipcount eval  --model RUN/final --dataset folder --root DATA --split test
and the same evaluation for the bundled demo model before fine-tuning. `--compare-published` also
fine-tunes once with the published from-scratch schedule (--contrastive-epochs 20 etc.: what
`--init` used before it had its own defaults) for contrast; that doubles the time.

    python benchmarks/finetune.py --out finetune.json
    python benchmarks/finetune.py --out finetune.json --max-steps 60      # a quicker look

Prints a table (MAE, RMSE, bias, count of an empty black tile) and writes the JSON. Needs
scikit-image, the package's `bench` extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", message="using the bundled demo model")

PROMPT = "stars"
BLOB_LOG = {"max_sigma": 30, "num_sigma": 10, "threshold": 0.1}  # scikit-image's blob-detection example


TRAIN_SIZES = (128, 176, 224, 288, 352, 436)
TEST_SIZES = (120, 150, 180, 210, 250, 290, 330, 370, 400, 436)


def tile_boxes(seed: int = 0) -> list[tuple[str, str, int, int, int]]:
    """(name, split, top, left, size): training tiles in columns 0-499, test tiles in 500-999."""
    rng = np.random.default_rng(seed)
    boxes = []
    for split, sizes, first_column in (("train", TRAIN_SIZES, 0), ("test", TEST_SIZES, 500)):
        for i, size in enumerate(sizes):
            top = int(rng.integers(0, 872 - size + 1))
            left = first_column + int(rng.integers(0, 500 - size + 1))
            boxes.append((f"{split}_{i:02d}_{size}px.png", split, top, left, size))
    return boxes


def make_dataset(folder: Path) -> dict[str, dict]:
    """Write the tiles (PNG) and annotations.csv (image,class,x,y,split) under `folder`.

    Returns {tile name: {"count": points, "split": "train" | "test"}}."""
    from PIL import Image
    from skimage import data
    from skimage.color import rgb2gray
    from skimage.feature import blob_log

    photo = data.hubble_deep_field()  # (872, 1000, 3) uint8
    blobs = blob_log(rgb2gray(photo), **BLOB_LOG)  # (N, 3): row, column, sigma
    folder.mkdir(parents=True, exist_ok=True)
    tiles: dict[str, dict] = {}
    rows = []
    for name, split, top, left, size in tile_boxes():
        Image.fromarray(photo[top:top + size, left:left + size]).save(folder / name)
        inside = blobs[(blobs[:, 0] >= top) & (blobs[:, 0] < top + size)
                       & (blobs[:, 1] >= left) & (blobs[:, 1] < left + size)]
        for y, x, _ in inside:  # pixel centres: +0.5
            rows.append([name, PROMPT, f"{x - left + 0.5:.1f}", f"{y - top + 0.5:.1f}", split])
        if len(inside) == 0:
            rows.append([name, PROMPT, "", "", split])
        tiles[name] = {"count": int(len(inside)), "split": split}
    blank = np.zeros((250, 250, 3), dtype=np.uint8)  # for the background floor, not in the points file
    Image.fromarray(blank).save(folder.parent / "empty_black.png")
    with open(folder / "annotations.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "class", "x", "y", "split"])
        writer.writerows(rows)
    return tiles


def clipcount(*args: str, env: dict[str, str]) -> tuple[float, float]:
    """Run `python -m clipcount ARGS` as a person would; returns (CPU seconds, wall seconds).

    CPU seconds (user + system of the process) are what the budget is about: on a shared machine
    the wall time mostly measures the neighbours."""
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", "clipcount", *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"clipcount {' '.join(args)} failed:\n{done.stdout[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu, time.perf_counter() - start


def evaluate(model: str, data: Path, out: Path, env: dict[str, str]) -> dict:
    """Held-out scores of `model` from `clipcount eval`, plus its count of an empty black tile."""
    clipcount("eval", "--model", model, "--dataset", "folder", "--root", str(data), "--split", "test",
              "--out", str(out), "--no-progress", env=env)
    with open(out / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    truth = np.array([float(row["gt"]) for row in rows])
    predicted = np.array([float(row["predicted"]) for row in rows])
    from clipcount import Counter

    empty = Counter.from_pretrained(model).count(str(data.parent / "empty_black.png"), PROMPT).count
    return {**scores(truth, predicted), "empty_tile": float(empty),
            "per_image": {row["image"]: float(row["predicted"]) for row in rows}}


def scores(truth: np.ndarray, predicted: np.ndarray) -> dict:
    error = predicted - truth
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            "bias": float(error.mean())}


def has_scikit_image() -> bool:
    """scikit-image imports (checked before any work, so a missing one is one line, not a traceback)."""
    import importlib.util

    try:
        return importlib.util.find_spec("skimage") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="finetune.json", help="JSON file for the results")
    parser.add_argument("--work", help="folder for the tiles and runs (default: a temporary folder)")
    parser.add_argument("--max-steps", type=int, help="stop each fine-tune after this many steps")
    parser.add_argument("--compare-published", action="store_true",
                        help="also fine-tune with the published from-scratch schedule")
    args = parser.parse_args(argv)
    if not has_scikit_image():
        print("benchmarks/finetune.py needs scikit-image (its images and points); install it with "
              "pip install -e '.[bench]'", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory(prefix="clipcount-finetune-") as scratch:
        work = Path(args.work or scratch)
        data = work / "hubble"
        tiles = make_dataset(data)
        train_counts = [t["count"] for t in tiles.values() if t["split"] == "train"]
        test = {name: t["count"] for name, t in tiles.items() if t["split"] == "test"}
        truth = np.array(list(test.values()), dtype=float)
        rows = {"training images' mean": {**scores(truth, np.full_like(truth, np.mean(train_counts))),
                                          "empty_tile": float(np.mean(train_counts)), "cpu_seconds": 0.0, "seconds": 0.0}}
        rows["demo model, not fine-tuned"] = {**evaluate("demo", data, work / "eval-demo", env),
                                              "cpu_seconds": 0.0, "seconds": 0.0}
        runs = {"fine-tuned (fine-tuning defaults)": []}
        if args.compare_published:
            runs["fine-tuned (published schedule)"] = ["--contrastive-epochs", "20", "--density-epochs", "180",
                                                       "--lr", "1e-4"]
        for i, (label, extra) in enumerate(runs.items()):
            run = work / f"run{i}"
            steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
            cpu, seconds = clipcount("train", "--dataset", "folder", "--root", str(data), "--init", "demo",
                                "--out", str(run), "--no-progress", *steps, *extra, env=env)
            rows[label] = {**evaluate(str(run / "final"), data, work / f"eval{i}", env), "cpu_seconds": cpu,
                           "seconds": seconds}
    print(table(rows, len(train_counts), truth))
    result = {"images": "skimage.data.hubble_deep_field, square tiles of 120-436 px", "points": f"skimage.feature.blob_log {BLOB_LOG}",
              "prompt": PROMPT, "train_counts": train_counts, "test_counts": test, "results": rows,
              "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


def table(rows: dict[str, dict], n_train: int, truth: np.ndarray) -> str:
    lines = [f"held-out: {len(truth)} tiles, {truth.min():.0f}-{truth.max():.0f} stars (mean {truth.mean():.1f}); "
             f"fine-tuned on {n_train} tiles; empty tile: the count of a black 250x250 image (0 is right)",
             f"{'model':38} {'MAE':>7} {'RMSE':>7} {'bias':>7} {'empty tile':>11} {'train CPU s':>12} {'wall s':>7}"]
    for label, row in rows.items():
        lines.append(f"{label:38} {row['mae']:7.1f} {row['rmse']:7.1f} {row['bias']:+7.1f} "
                     f"{row['empty_tile']:11.1f} {row['cpu_seconds']:12.0f} {row['seconds']:7.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
