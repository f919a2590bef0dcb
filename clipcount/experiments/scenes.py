"""Test scenes, counting them, and the numbers the reports are made of.

A `TestScene` is one image with one or more queries (row name -> prompt and true count), so a
scene is encoded once for all the prompts asked of it. Synthetic scenes come from the world in test
mode with seeds of their own (`scene_rng`); FSC-147 scenes are the images of a split.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clipcount.engine.metrics import count_metrics
from clipcount.experiments.common import RunContext
from clipcount.modeling.clip_count import ClipCount
from clipcount.synthetic.world import Scene, WorldConfig

SceneMaker = Callable[[np.random.Generator, WorldConfig], tuple[Scene, str]]


@dataclass
class Query:
    prompt: str
    truth: float


@dataclass
class TestScene:
    name: str
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8, or float32 in [0, 1]
    queries: dict[str, Query]  # row -> what to count
    meta: dict[str, Any] = field(default_factory=dict)


# ---- synthetic scenes ---------------------------------------------------------------------------

def test_world(ctx: RunContext, **changes: Any) -> WorldConfig:
    return WorldConfig(**{**ctx.budget.world, **changes, "mode": "test"})


def scene_rng(ctx: RunContext, tag: int, index: int) -> np.random.Generator:
    """Scene `index` of test set `tag`: a seed sequence of its own, never a training stream's."""
    return np.random.default_rng(np.random.SeedSequence([ctx.test_seed, int(tag), int(index), 17]))


def synthetic_scenes(ctx: RunContext, maker: SceneMaker, n: int, tag: int, world: WorldConfig | None = None,
                     rows: Callable[[Scene, str], dict[str, Query]] | None = None, kind: str = "") -> list[TestScene]:
    """n scenes from `maker(rng, world)`; `rows` turns (scene, prompt) into queries (default: one
    row "main" with the maker's prompt)."""
    world = world or test_world(ctx)
    scenes = []
    for i in range(n):
        scene, prompt = maker(scene_rng(ctx, tag, i), world)
        queries = rows(scene, prompt) if rows else {"main": Query(prompt, scene.count(prompt))}
        scenes.append(TestScene(f"{kind or tag}-{i}", scene.image, queries, describe_scene(scene, prompt, kind)))
    return scenes


def describe_scene(scene: Scene, prompt: str, kind: str) -> dict[str, Any]:
    """What the reports slice by: the prompted objects' size, count, crowding."""
    from clipcount.synthetic.prompts import parse_prompt

    colour, shape = parse_prompt(prompt)
    target = scene.select(colour, shape)
    sizes = np.array([o.size for o in target], dtype=np.float64)
    return {
        "kind": kind, "prompt": prompt, "count": len(target), "objects": len(scene.objects),
        "mean_size": float(sizes.mean()) if len(sizes) else math.nan,
        "overlap": overlap_fraction(scene, target),
        "width": scene.width, "height": scene.height,
        "points": scene.points(colour, shape),  # (N, 2) x, y of the prompted objects
    }


def overlap_fraction(scene: Scene, target: Sequence | None = None) -> float:
    """Share of (target) objects whose circumscribed circle meets another object's: how crowded."""
    objects = scene.objects
    target = objects if target is None else target
    if not target or len(objects) < 2:
        return 0.0
    centres = np.array([(o.x, o.y) for o in objects])  # (N, 2)
    radii = np.array([o.size / 2 for o in objects])  # (N,)
    hits = 0
    for obj in target:
        distance = np.hypot(centres[:, 0] - obj.x, centres[:, 1] - obj.y)
        touching = (distance < radii + obj.size / 2) & (distance > 1e-6)
        hits += bool(touching.any())
    return hits / len(target)


def standard_sets(ctx: RunContext) -> dict[str, list[TestScene]]:
    """The count-error test sets every training comparison reports.

    Synthetic: "seen" (training classes, scenes drawn like training ones) and "held-out" (the
    prompted colour-shape combination never appeared in training). FSC-147: "val" and "test"
    (classes disjoint from training)."""
    if ctx.synthetic:
        from clipcount.synthetic.world import make_held_out_scene, make_seen_scene

        n = ctx.budget.test_scenes
        return {"seen": synthetic_scenes(ctx, make_seen_scene, n, tag=1, kind="seen"),
                "held-out": synthetic_scenes(ctx, make_held_out_scene, n, tag=2, kind="held-out")}
    return {split: fsc_scenes(ctx, split, ctx.budget.fsc_images) for split in ("val", "test")}


def window_crops(ctx: RunContext, scenes: Sequence[TestScene], n: int, size: int | None = None) -> list[dict[str, Any]]:
    """n window-sized crops of test scenes with the prompted objects' density map, for patch-level
    measurements: dict(image (3, S, S) float32, density (1, S, S), prompt, name)."""
    from clipcount.data.density import points_to_density

    size = size or ctx.budget.window
    rng = np.random.default_rng(np.random.SeedSequence([ctx.test_seed, 99]))
    crops = []
    for i in range(min(n, len(scenes))):
        scene = scenes[i]
        image = as_tensor(scene.image)  # (3, H, W)
        points = np.asarray(scene.meta["points"], dtype=np.float32).reshape(-1, 2)
        scale = size / image.shape[1]
        if image.shape[1] != size:
            width = max(1, round(image.shape[2] * scale))
            image = torch.nn.functional.interpolate(image[None], size=(size, width), mode="bilinear",
                                                    align_corners=False, antialias=True)[0]
            points = points * np.float32(scale)
        if image.shape[2] < size:  # narrow: pad with the mean colour, as the window protocol does
            pad = image.mean(dim=(1, 2), keepdim=True).expand(3, size, size - image.shape[2])
            image = torch.cat([image, pad], dim=2)
        x0 = int(rng.integers(0, image.shape[2] - size + 1))
        image = image[:, :, x0:x0 + size]
        inside = points[(points[:, 0] >= x0) & (points[:, 0] < x0 + size)] - np.array([x0, 0], np.float32)
        density = points_to_density(inside, size, size, 1.0, 60.0)  # (S, S)
        crops.append({"image": image.contiguous(), "density": torch.from_numpy(density)[None],
                      "prompt": next(iter(scene.queries.values())).prompt, "name": scene.name})
    return crops


# ---- FSC-147 scenes -----------------------------------------------------------------------------

def fsc_scenes(ctx: RunContext, split: str, limit: int | None = None) -> list[TestScene]:
    """The first `limit` images of an FSC-147 split, each with its class name as the query."""
    from clipcount.data import build_dataset

    dataset = build_dataset("fsc147", ctx.root, split)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    scenes = []
    for i in range(count):
        sample = dataset[i]
        boxes = sample.boxes if sample.boxes is not None else np.zeros((0, 4), np.float32)
        sizes = np.sqrt(np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None))
        scenes.append(TestScene(sample.name, sample.image, {"main": Query(sample.prompt, float(sample.count))}, {
            "kind": split, "prompt": sample.prompt, "count": sample.count,
            "mean_size": float(sizes.mean()) if len(sizes) else math.nan,
            "crowding": fsc_crowding(sample.points, sizes),
            "points": sample.points, "width": sample.width, "height": sample.height,
        }))
    return scenes


def fsc_crowding(points: np.ndarray, sizes: np.ndarray) -> float:
    """Exemplar size over the median nearest-neighbour distance: above 1, objects touch or overlap."""
    if len(points) < 2 or not len(sizes):
        return 0.0
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(points).query(points, k=2)
    gap = float(np.median(distances[:, 1]))
    return float(np.mean(sizes)) / max(gap, 1e-6)


# ---- counting -----------------------------------------------------------------------------------

def as_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 or float -> (3, H, W) float32 in [0, 1]."""
    array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def count_scenes(ctx: RunContext, model: ClipCount, scenes: Sequence[TestScene], stride: int | None = None,
                 rows: Iterable[str] | None = None, label: str = "") -> list[dict[str, float]]:
    """Predicted count of every query (or of `rows` only) in every scene; one image encoding per scene."""
    from tqdm.auto import tqdm

    from clipcount.engine.inference import DensityPredictor

    stride = stride or ctx.budget.eval_stride(model.config.window_size)
    predictor = DensityPredictor(model, stride=stride, device=ctx.device, precision="fp32")
    wanted = set(rows) if rows is not None else None
    predictions = []
    for scene in tqdm(scenes, desc=f"count {label}".strip(), unit="scene", disable=not ctx.progress,
                      dynamic_ncols=True, leave=False):
        names = [r for r in scene.queries if wanted is None or r in wanted]
        densities = predictor.predict(as_tensor(scene.image), [scene.queries[r].prompt for r in names])
        predictions.append({r: predictor.count(d) for r, d in zip(names, densities)})
    return predictions


def pairs(scenes: Sequence[TestScene], predictions: Sequence[dict[str, float]], row: str,
          keep: Callable[[TestScene], bool] | None = None) -> tuple[list[float], list[float]]:
    """(predicted, true) counts of one row over the scenes that have it (and pass `keep`)."""
    pred, truth = [], []
    for scene, counts in zip(scenes, predictions):
        if row in counts and (keep is None or keep(scene)):
            pred.append(counts[row])
            truth.append(scene.queries[row].truth)
    return pred, truth


def error_row(pred: Sequence[float], truth: Sequence[float], **labels: Any) -> dict[str, Any]:
    """A table row: labels, then n, mean true count, MAE, RMSE, NAE and mean signed error (bias)."""
    row = dict(labels)
    if not truth:
        return {**row, "n": 0, "true mean": math.nan, "MAE": math.nan, "RMSE": math.nan, "NAE": math.nan,
                "bias": math.nan}
    m = count_metrics(pred, truth)
    bias = float(np.mean(np.asarray(pred) - np.asarray(truth)))
    return {**row, "n": m.n, "true mean": float(np.mean(truth)), "MAE": m.mae, "RMSE": m.rmse, "NAE": m.nae,
            "bias": bias}


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    positive, negative = np.asarray(positive, float).ravel(), np.asarray(negative, float).ravel()
    if not len(positive) or not len(negative):
        return math.nan
    ordered = np.sort(negative)
    below = np.searchsorted(ordered, positive, side="left")  # negatives strictly below each positive
    ties = np.searchsorted(ordered, positive, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(positive) * len(negative)))


# ---- cost ---------------------------------------------------------------------------------------

def window_gflops(model: ClipCount) -> dict[str, float]:
    """GFLOPs (multiply-adds counted as 2) of one window: image encoding, density head, one prompt."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    size = model.config.window_size
    device = next(model.parameters()).device
    image = torch.rand(1, 3, size, size, device=device)
    # The counter's module hooks trip over views of parameters that require grad (made under
    # no_grad they have no grad_fn): count with every parameter frozen, then restore.
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        return _count_window(model, image, size, FlopCounterMode)
    finally:
        for param in trainable:
            param.requires_grad_(True)


def _count_window(model: ClipCount, image: torch.Tensor, size: int, FlopCounterMode) -> dict[str, float]:
    with torch.no_grad():  # not inference_mode: the FLOP counter's module hooks need ordinary tensors
        with FlopCounterMode(display=False) as counter:
            tokens = model.encode_image(image)
        image_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            text = model.encode_text(["red circles"])
        text_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.density_from_features(tokens, text, (size, size))
        density_flops = counter.get_total_flops()
    return {"image": image_flops / 1e9, "density": density_flops / 1e9, "text": text_flops / 1e9}


def windows_per_image(width: int, height: int, window: int, stride: int, image_height: int | None = None) -> int:
    """How many windows the protocol cuts from an image (resized to `image_height`, default the window's)."""
    from clipcount.engine.windows import plan_windows

    image_height = image_height or window
    resized = max(1, round(width * image_height / height))
    return plan_windows(image_height, resized, window, stride).num_windows


def image_gflops(flops: dict[str, float], windows: float) -> float:
    """One image, one prompt: every window encoded and decoded, the prompt encoded once."""
    return windows * (flops["image"] + flops["density"]) + flops["text"]


def latency(ctx: RunContext, model: ClipCount, scenes: Sequence[TestScene], stride: int, repeats: int) -> float:
    """Median seconds to count one prompt in a scene (a new predictor each time: no cached text)."""
    from clipcount.engine.inference import DensityPredictor

    times = []
    for i in range(max(1, repeats)):
        scene = scenes[i % len(scenes)]
        query = next(iter(scene.queries.values()))
        predictor = DensityPredictor(model, stride=stride, device=ctx.device, precision="fp32")
        image = as_tensor(scene.image)
        if i == 0:  # warm-up (allocator, kernels), not timed
            predictor.predict(image, [query.prompt])
            predictor = DensityPredictor(model, stride=stride, device=ctx.device, precision="fp32")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        predictor.predict(image, [query.prompt])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


# ---- comparing models ---------------------------------------------------------------------------

BASELINE = "training-mean baseline"


def training_mean(ctx: RunContext) -> float:
    """The mean true count of a prompted class in training scenes (synthetic: 300 training scenes
    of the budget's world; FSC-147: the first `fsc_images` train images): the answer of a model
    that learned nothing but the average."""
    if ctx.baseline_count is None:
        if ctx.synthetic:
            from clipcount.synthetic.stream import mean_training_count

            ctx.baseline_count = mean_training_count(WorldConfig(**ctx.budget.world), seed=ctx.seed, n=300)
        else:
            train = fsc_scenes(ctx, "train", ctx.budget.fsc_images)
            ctx.baseline_count = float(np.mean([s.queries["main"].truth for s in train]))
        ctx.log(f"the training-mean baseline answers {ctx.baseline_count:.2f}")
        ctx.notes.append(f"training-mean baseline: always answers {ctx.baseline_count:.2f}")
    return ctx.baseline_count


def baseline_error(ctx: RunContext, scenes: Sequence[TestScene], row: str = "main", **labels: Any) -> dict[str, Any]:
    """The error row of always answering the training mean on these scenes."""
    truth = [s.queries[row].truth for s in scenes if row in s.queries]
    return error_row([training_mean(ctx)] * len(truth), truth, **labels)


def baseline_rows(ctx: RunContext, sets: dict[str, list[TestScene]], row: str = "main") -> dict[str, dict[str, Any]]:
    """Error rows of always answering the training mean, per set (the floor a model must beat)."""
    return {name: baseline_error(ctx, scenes, row, variant=BASELINE, set=name) for name, scenes in sets.items()}


def compare_models(ctx: RunContext, models: dict[str, ClipCount], sets: dict[str, list[TestScene]],
                   row: str = "main", baseline: bool = True,
                   ) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    """Count every set with every model: table rows (one per model and set, then the
    training-mean baseline's) and label -> set -> error row, for findings and results.json."""
    table, scores = [], {}
    for label, model in models.items():
        scores[label] = {}
        for set_name, scenes in sets.items():
            predictions = count_scenes(ctx, model, scenes, rows=[row], label=f"{label} {set_name}")
            result = error_row(*pairs(scenes, predictions, row), variant=label, set=set_name)
            scores[label][set_name] = result
            table.append(result)
        ctx.log("  ".join(f"{label} {s}: MAE {r['MAE']:.2f} NAE {r['NAE']:.3f}" for s, r in scores[label].items()))
    if baseline:
        scores[BASELINE] = baseline_rows(ctx, sets, row)
        table += list(scores[BASELINE].values())
    return table, scores
