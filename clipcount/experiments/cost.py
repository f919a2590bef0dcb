"""Experiment 6 (open question: the efficiency of the multi-scale fusion): accuracy against cost.

Two sweeps on the same test scenes (synthetic: seen classes; FSC-147: the test split):
- the interaction variants of experiment 2 (1, 2 and 3 scales; trained here or taken from the cache);
- the window stride of the evaluation protocol, on the paper's configuration (or --model): a larger
  stride cuts fewer overlapping windows per image.
Cost is GFLOPs per image (torch's FLOP counter: matrix products and convolutions, a multiply-add
counted as 2; one prompt, every window encoded once) and measured latency per image (median of
`latency_repeats` runs, one prompt, text not cached, on this run's device: compare within a run).
"""

from __future__ import annotations

import numpy as np
import torch

from clipcount.experiments import plots
from clipcount.experiments.common import Report, RunContext, Section, Table, percent_change
from clipcount.experiments.scales import variants as scale_variants
from clipcount.experiments.scenes import (
    baseline_error,
    count_scenes,
    error_row,
    fsc_scenes,
    image_gflops,
    latency,
    pairs,
    standard_sets,
    window_gflops,
    windows_per_image,
)
from clipcount.experiments.training import loaded_baseline, trained

QUESTION = (
    "CLIP-Count's multi-scale fusion and the overlapping-window protocol (384-pixel windows every 128 pixels) "
    "both spend compute for accuracy, and the paper reports neither's cost. Which settings buy accuracy "
    "cheaply: how much error does each interaction scale and each window stride save per FLOP and per "
    "millisecond?"
)


def run(ctx: RunContext) -> Report:
    threads = torch.get_num_threads()

    def test_scenes() -> list:
        return standard_sets(ctx)["seen"] if ctx.synthetic else fsc_scenes(ctx, "test", ctx.budget.fsc_images)

    def measure(label: str, model, stride: int, **extra) -> dict:
        window = model.config.window_size
        timing_scenes = scenes[: max(1, ctx.budget.latency_repeats)]
        predictions = count_scenes(ctx, model, scenes, stride=stride, label=f"{label} stride {stride}")
        row = error_row(*pairs(scenes, predictions, "main"), variant=label, stride=stride, **extra)
        windows = float(np.mean([windows_per_image(s.image.shape[1], s.image.shape[0], window, stride)
                                 for s in scenes]))
        flops = window_gflops(model)
        row.update({"windows/image": windows, "GFLOPs/image": image_gflops(flops, windows),
                    "latency ms/image": 1000 * latency(ctx, model, timing_scenes, stride, ctx.budget.latency_repeats)})
        ctx.log(f"{label} stride {stride}: NAE {row['NAE']:.3f}, {row['GFLOPs/image']:.3f} GFLOPs, "
                f"{row['latency ms/image']:.1f} ms")
        return row

    scenes = test_scenes()
    stride = ctx.budget.eval_stride()
    if ctx.model is not None:
        ctx.notes.append("the interaction variants are trained at the budget; --model is used for the stride sweep")
    interaction_rows = []
    for variant in scale_variants():
        item = trained(ctx, variant)
        interaction_rows.append(measure(variant.label, item.model, stride,
                                        scales=item.model.config.interaction.scales))
    baseline = loaded_baseline(ctx)  # with --model, may switch to the checkpoint's own world
    if ctx.model is not None:
        scenes = test_scenes()
    window, interaction_stride = baseline.model.config.window_size, stride
    stride = ctx.budget.eval_stride(window)
    strides = sorted({max(1, window // k) for k in ctx.budget.stride_divisors} | {stride}, reverse=True)
    stride_rows = [measure(baseline.label, baseline.model, s, scales=baseline.model.config.interaction.scales)
                   for s in strides]

    columns = ["variant", "scales", "stride", "windows/image", "GFLOPs/image", "latency ms/image", "MAE", "NAE",
               "bias"]
    plot_files = [
        plots.xy_chart(ctx.out / "error_vs_flops.png", {
            "interaction scales": ([r["GFLOPs/image"] for r in interaction_rows], [r["NAE"] for r in interaction_rows]),
            "window stride": ([r["GFLOPs/image"] for r in stride_rows], [r["NAE"] for r in stride_rows]),
        }, "accuracy against FLOPs", "GFLOPs per image", "NAE", point_labels={
            "interaction scales": [f"{r['scales']} sc" for r in interaction_rows],
            "window stride": [f"s{r['stride']}" for r in stride_rows]}).name,
        plots.xy_chart(ctx.out / "error_vs_latency.png", {
            "interaction scales": ([r["latency ms/image"] for r in interaction_rows],
                                   [r["NAE"] for r in interaction_rows]),
            "window stride": ([r["latency ms/image"] for r in stride_rows], [r["NAE"] for r in stride_rows]),
        }, "accuracy against latency", f"ms per image ({ctx.device or 'auto'} device, {threads} threads)", "NAE",
            point_labels={"interaction scales": [f"{r['scales']} sc" for r in interaction_rows],
                          "window stride": [f"s{r['stride']}" for r in stride_rows]}).name,
    ]
    report = Report(experiment="cost", title="Experiment 6: the cost of multi-scale fusion and window overlap",
                    question=QUESTION)
    report.sections = [
        Section("Interaction scales", f"Stride {interaction_stride} (a third of the window, the protocol).",
                [Table("Interaction variants", columns, interaction_rows)]),
        Section("Window stride", f"The {baseline.label} model; stride {window} means windows do not overlap.",
                [Table("Stride sweep", columns, stride_rows)], plot_files),
    ]
    baseline = baseline_error(ctx, scenes)
    report.findings = findings(interaction_rows, stride_rows) + [
        f"Always answering the training mean: NAE {baseline['NAE']:.3f} on the same scenes."]
    report.results = {"interaction": interaction_rows, "stride": stride_rows, "threads": threads}
    return report


def findings(interaction_rows: list[dict], stride_rows: list[dict]) -> list[str]:
    out = []
    by_scales = {r["scales"]: r for r in interaction_rows}
    for k in sorted(by_scales)[1:]:
        prev, cur = by_scales[k - 1] if k - 1 in by_scales else None, by_scales[k]
        if prev:
            out.append(f"{k - 1} -> {k} scales: {cur['GFLOPs/image'] / prev['GFLOPs/image']:.2f}x the FLOPs, "
                       f"{cur['latency ms/image'] / prev['latency ms/image']:.2f}x the latency, NAE "
                       f"{prev['NAE']:.3f} -> {cur['NAE']:.3f} ({percent_change(prev['NAE'], cur['NAE'])}).")
    if len(stride_rows) >= 2:
        sparse, dense = stride_rows[0], stride_rows[-1]
        more = dense["windows/image"] / sparse["windows/image"]
        out.append(f"Stride {sparse['stride']} -> {dense['stride']}: {more:.2f}x "
                   f"the windows and {dense['latency ms/image'] / sparse['latency ms/image']:.2f}x the latency, NAE "
                   f"{sparse['NAE']:.3f} -> {dense['NAE']:.3f} ({percent_change(sparse['NAE'], dense['NAE'])}).")
    return out
