"""Experiment 2: the hierarchical interaction with 1, 2 (the paper) and 3 scales.

Each added scale refines the patch-text map at twice the resolution (block k at grid * 2**k), which
the paper argues helps small objects. Count error is reported per object-size bucket: on the
synthetic world each bucket is its own test set, drawn with object diameters limited to one third
(in log scale) of the world's size range; on FSC-147 the buckets are the tertiles of the exemplar
boxes' size. FLOPs per image (one prompt, the window protocol at the evaluation stride) sit next to
the errors, measured with torch's FLOP counter (matrix products and convolutions, a multiply-add
counted as 2).
"""

from __future__ import annotations

import math

import numpy as np

from clipcount.experiments import plots
from clipcount.experiments.common import Report, RunContext, Section, Table, percent_change
from clipcount.experiments.scenes import (
    BASELINE,
    baseline_error,
    count_scenes,
    error_row,
    fsc_scenes,
    image_gflops,
    pairs,
    synthetic_scenes,
    test_world,
    window_gflops,
    windows_per_image,
)
from clipcount.experiments.training import Variant, refuse_model, trained

QUESTION = (
    "CLIP-Count's interaction module works at two scales (14x14, then 28x28 after a convolution and x2 "
    "upsampling), feeding a decoder with a lateral connection from the finer map; the paper argues the finer "
    "scale helps with small, dense objects. Here 1, 2 and 3 scales are trained at the same budget: is the error "
    "on small objects lower with more scales, and what does each scale cost?"
)
BUCKETS = ("small", "medium", "large")


def variants() -> list[Variant]:
    return [
        Variant("scales-1", model={"interaction.scales": 1}, description="one interaction block at the patch grid"),
        Variant("paper", description="two scales (the paper)"),
        Variant("scales-3", model={"interaction.scales": 3}, description="three scales: grid, x2, x4"),
    ]


def size_edges(ctx: RunContext) -> list[float]:
    """Bucket edges of object diameter: the world's [min_size, max_size] cut in thirds of log size."""
    low, high = float(ctx.budget.world["min_size"]), float(ctx.budget.world["max_size"])
    return [low * (high / low) ** (k / 3) for k in range(4)]


def bucket_sets(ctx: RunContext) -> tuple[dict[str, list], str]:
    """Test scenes per size bucket, and a sentence saying how they were made."""
    if ctx.synthetic:
        from clipcount.synthetic.world import make_seen_scene

        edges = size_edges(ctx)
        sets = {}
        for k, name in enumerate(BUCKETS):
            world = test_world(ctx, min_size=round(edges[k], 2), max_size=round(edges[k + 1], 2))
            sets[name] = synthetic_scenes(ctx, make_seen_scene, ctx.budget.test_scenes, tag=20 + k, world=world,
                                          kind=name)
        text = ("Synthetic scenes of training classes, one test set per bucket, object diameters "
                + ", ".join(f"{n} {edges[k]:.1f}-{edges[k + 1]:.1f} px" for k, n in enumerate(BUCKETS))
                + f" in {ctx.budget.window}-pixel-high images (sizes shrink a little in crowded scenes).")
        return sets, text
    scenes = fsc_scenes(ctx, "test", ctx.budget.fsc_images)
    sizes = np.array([s.meta["mean_size"] for s in scenes])
    cuts = np.nanquantile(sizes, [1 / 3, 2 / 3]) if np.isfinite(sizes).any() else [math.inf, math.inf]
    index = np.digitize(np.nan_to_num(sizes, nan=0.0), cuts)
    sets = {name: [s for s, i in zip(scenes, index) if i == k] for k, name in enumerate(BUCKETS)}
    text = (f"FSC-147 test images split in tertiles of the exemplar boxes' size (sqrt of area): cuts at "
            f"{cuts[0]:.1f} and {cuts[1]:.1f} px.")
    return sets, text


def run(ctx: RunContext) -> Report:
    refuse_model(ctx)
    models = {v.label: trained(ctx, v) for v in variants()}
    sets, bucket_text = bucket_sets(ctx)
    all_scenes = [s for scenes in sets.values() for s in scenes]
    window = next(iter(models.values())).model.config.window_size
    mean_width = float(np.mean([s.image.shape[1] * window / s.image.shape[0] for s in all_scenes]))
    stride = ctx.budget.eval_stride(window)
    windows = float(np.mean([windows_per_image(s.image.shape[1], s.image.shape[0], window, stride)
                             for s in all_scenes]))
    rows, error_rows, results = [], [], {}
    for label, item in models.items():
        scales = item.model.config.interaction.scales
        flops = window_gflops(item.model)
        entry = {"variant": label, "scales": scales, "trainable parameters": item.trainable,
                 "GFLOPs/window": flops["image"] + flops["density"],
                 "GFLOPs/image": image_gflops(flops, windows), "density-head GFLOPs/window": flops["density"]}
        preds, truths = [], []
        bucket_scores = {}
        for name, scenes in sets.items():
            predictions = count_scenes(ctx, item.model, scenes, label=f"{label} {name}")
            p, t = pairs(scenes, predictions, "main")
            preds += p
            truths += t
            bucket_scores[name] = error_row(p, t, variant=label, scales=scales, bucket=name)
            error_rows.append(bucket_scores[name])
            entry[f"MAE {name}"] = bucket_scores[name]["MAE"]
            entry[f"NAE {name}"] = bucket_scores[name]["NAE"]
        overall = error_row(preds, truths)
        entry["MAE all"], entry["NAE all"] = overall["MAE"], overall["NAE"]
        rows.append(entry)
        results[label] = {"summary": entry, "buckets": bucket_scores, "flops": flops}
        ctx.log(f"{label}: " + ", ".join(f"{n} MAE {bucket_scores[n]['MAE']:.2f}" for n in BUCKETS)
                + f"; {entry['GFLOPs/image']:.3f} GFLOPs/image")

    baseline = {"variant": BASELINE, "scales": "-"}
    for name, scenes in sets.items():
        result = baseline_error(ctx, scenes)
        baseline[f"MAE {name}"], baseline[f"NAE {name}"] = result["MAE"], result["NAE"]
    result = baseline_error(ctx, all_scenes)
    baseline["MAE all"], baseline["NAE all"] = result["MAE"], result["NAE"]
    series = {f"{r['scales']} scale(s)": [r[f"NAE {b}"] for b in BUCKETS] for r in rows}
    series["training mean"] = [baseline[f"NAE {b}"] for b in BUCKETS]
    plot_files = [
        plots.bar_chart(ctx.out / "error_by_size.png", list(BUCKETS), series,
                        "relative count error (NAE) by object size", "NAE").name,
        plots.xy_chart(ctx.out / "error_vs_flops.png",
                       {"interaction scales": ([r["GFLOPs/image"] for r in rows], [r["NAE all"] for r in rows])},
                       "error against cost", "GFLOPs per image", "NAE (all sizes)",
                       point_labels={"interaction scales": [f"{r['scales']}" for r in rows]}).name,
    ]
    report = Report(experiment="scales", title="Experiment 2: interaction scales", question=QUESTION)
    summary_cols = ["variant", "scales", "trainable parameters", "GFLOPs/window", "GFLOPs/image"] + \
        [f"MAE {b}" for b in BUCKETS] + ["MAE all", "NAE all"]
    report.sections = [
        Section("Accuracy and cost", f"{bucket_text} FLOPs per image: one prompt over the mean test image "
                f"({mean_width:.0f} px wide after resizing, {windows:.1f} windows at stride {stride}).",
                [Table("Error per object size, and cost", summary_cols, rows + [baseline])], plot_files),
        Section("Per bucket", "", [Table("Count error per size bucket", ["variant", "scales", "bucket", "n",
                                                                          "true mean", "MAE", "RMSE", "NAE", "bias"],
                                         error_rows)]),
    ]
    report.findings = findings(rows) + [
        "Always answering the training mean: NAE " + ", ".join(f"{b} {baseline[f'NAE {b}']:.3f}" for b in BUCKETS)
        + f", all {baseline['NAE all']:.3f}."]
    report.results = {"variants": results, "size_edges": size_edges(ctx) if ctx.synthetic else None,
                      "windows_per_image": windows}
    return report


def findings(rows: list[dict]) -> list[str]:
    by_scales = {r["scales"]: r for r in rows}
    out = []
    one, two = by_scales.get(1), by_scales.get(2)
    for bucket in BUCKETS:
        ordered = sorted(rows, key=lambda r: r[f"NAE {bucket}"])
        out.append(f"{bucket} objects: lowest error with {ordered[0]['scales']} scale(s) "
                   f"(NAE " + ", ".join(f"{r['scales']}: {r[f'NAE {bucket}']:.3f}" for r in rows) + ").")
    if one and two:
        out.append(f"The second scale changes small-object MAE by {percent_change(one['MAE small'], two['MAE small'])} "
                   f"and large-object MAE by {percent_change(one['MAE large'], two['MAE large'])}, for "
                   f"{two['GFLOPs/image'] / one['GFLOPs/image']:.2f}x the FLOPs per image.")
    three = by_scales.get(3)
    if two and three:
        out.append(f"A third scale changes overall MAE by {percent_change(two['MAE all'], three['MAE all'])} for "
                   f"{three['GFLOPs/image'] / two['GFLOPs/image']:.2f}x the FLOPs of two.")
    return out
