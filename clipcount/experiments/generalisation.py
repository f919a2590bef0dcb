"""Experiment 5 (open question: the limits of zero-shot): where does counting stop working?

Three slices of the error of one model (the paper's configuration, or --model):
- by class novelty: seen classes; held-out colour-shape combinations (both words seen in training,
  never together); and unseen words. The synthetic world has 6 colours x 6 shapes and every colour
  and shape word appears in training, so the last row prompts seen-class scenes with words that
  never appeared in any training text ("crimson circles", "red balls"), alternating an unseen colour
  word and an unseen shape word;
- by the number of instances (1 to 250): scenes with the prompted class's count drawn in each bin,
  one distractor class beside it, at the world's widest image;
- by crowding: the world's overlap bound `separation` from 1 (circumscribed circles never meet) to
  0 (objects may cover each other up to their centres), with the measured share of prompted
  objects that touch another.
On FSC-147: train-split images (seen classes) against val and test (unseen classes), count bins
and tertiles of crowding (exemplar size over the median nearest-neighbour distance) of the test set.
"""

from __future__ import annotations

import math

import numpy as np

from clipcount.experiments import plots
from clipcount.experiments.common import Report, RunContext, Section, Table
from clipcount.experiments.scenes import (
    Query,
    baseline_error,
    count_scenes,
    error_row,
    fsc_scenes,
    pairs,
    standard_sets,
    synthetic_scenes,
    test_world,
)
from clipcount.experiments.specificity import COLOUR_SYNONYMS, SHAPE_SYNONYMS
from clipcount.experiments.training import loaded_baseline
from clipcount.synthetic.prompts import format_prompt, parse_prompt
from clipcount.synthetic.world import make_scene, make_seen_scene, sample_classes

QUESTION = (
    "CLIP-Count claims zero-shot counting: classes never seen in training are counted from their name alone, "
    "because the frozen CLIP aligns the words with the image. How far does that reach? Is a new combination of "
    "seen words as easy as a seen class, and a word never seen in training? And how does the error grow with "
    "the number of objects (the paper's weak spot on dense crowds: ShanghaiTech A MAE 197) and with overlap?"
)


def unseen_word_rows(scene, prompt: str) -> dict[str, Query]:
    """A seen-class scene worded with an unseen colour word or an unseen shape word, alternating by
    the parity of the scene's object count (a stable, seed-determined choice)."""
    colour, shape = parse_prompt(prompt)
    if len(scene.objects) % 2 == 0:
        text = f"{COLOUR_SYNONYMS[colour]} {format_prompt(None, shape)}"
    else:
        text = f"{colour} {SHAPE_SYNONYMS[shape]}"
    return {"main": Query(text, scene.count(prompt))}


def count_maker(low: int, high: int):
    """Scenes whose prompted (training) class has low..high-1 objects, beside one distractor class."""
    def make(rng, world):
        target, other = sample_classes(rng, world.replace(mode="train"), k=2)
        classes = {target: int(rng.integers(low, high)), other: int(rng.integers(1, 31))}
        for _ in range(10):
            scene = make_scene(rng, world, classes, width=world.max_width)
            if scene.select(*target):
                return scene, format_prompt(*target)
        raise RuntimeError("could not place the prompted class")
    return make


def slice_rows(ctx, model, named_sets: dict[str, list], extra=None) -> list[dict]:
    rows = []
    for name, scenes in named_sets.items():
        predictions = count_scenes(ctx, model, scenes, label=name)
        row = error_row(*pairs(scenes, predictions, "main"), slice=name)
        row["baseline NAE"] = baseline_error(ctx, scenes)["NAE"]
        if extra:
            row.update(extra(name, scenes))
        rows.append(row)
        ctx.log(f"{name}: n {row['n']} MAE {row['MAE']:.2f} NAE {row['NAE']:.3f}")
    return rows


def run(ctx: RunContext) -> Report:
    baseline = loaded_baseline(ctx)
    model = baseline.model
    budget = ctx.budget
    n = budget.test_scenes
    edges = list(budget.count_bins)
    bins = [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    if ctx.synthetic:
        standard = standard_sets(ctx)
        novelty_sets = {"seen classes": standard["seen"], "held-out combinations": standard["held-out"],
                        "unseen words": synthetic_scenes(ctx, make_seen_scene, n, tag=50, kind="unseen-words",
                                                         rows=unseen_word_rows)}
        per_bin = max(2, n // 2)
        count_sets = {f"{lo}-{hi - 1}": synthetic_scenes(ctx, count_maker(lo, hi), per_bin, tag=60 + i,
                                                         kind=f"count {lo}-{hi - 1}")
                      for i, (lo, hi) in enumerate(bins)}
        crowd_sets = {f"separation {s:g}": synthetic_scenes(ctx, make_seen_scene, n, tag=80 + i,
                                                            world=test_world(ctx, separation=s), kind=f"sep {s:g}")
                      for i, s in enumerate(budget.separations)}
        crowd_text = ("The world's overlap bound: two objects' centres are at least r_big + separation * r_small "
                      "apart (1: circumscribed circles never meet; 0: an object may cover another up to its centre).")
    else:
        novelty_sets = {"seen classes (train split)": fsc_scenes(ctx, "train", budget.fsc_images),
                        "unseen classes (val)": fsc_scenes(ctx, "val", budget.fsc_images),
                        "unseen classes (test)": fsc_scenes(ctx, "test", budget.fsc_images)}
        test = novelty_sets["unseen classes (test)"]
        count_sets = {f"{lo}-{hi - 1}": [s for s in test if lo <= s.queries["main"].truth < hi] for lo, hi in bins}
        count_sets[f">={edges[-1]}"] = [s for s in test if s.queries["main"].truth >= edges[-1]]
        crowding = np.array([s.meta["crowding"] for s in test])
        cuts = np.quantile(crowding, [1 / 3, 2 / 3]) if len(crowding) else [0.0, 0.0]
        crowd_sets = {"sparse": [s for s in test if s.meta["crowding"] < cuts[0]],
                      "medium": [s for s in test if cuts[0] <= s.meta["crowding"] < cuts[1]],
                      "crowded": [s for s in test if s.meta["crowding"] >= cuts[1]]}
        crowd_text = (f"Crowding = exemplar size / median nearest-neighbour distance; tertile cuts "
                      f"{cuts[0]:.2f} and {cuts[1]:.2f}.")
    count_sets = {k: v for k, v in count_sets.items() if v}
    crowd_sets = {k: v for k, v in crowd_sets.items() if v}

    ctx.log("class novelty")
    novelty = slice_rows(ctx, model, novelty_sets)
    ctx.log("number of instances")
    counts = slice_rows(ctx, model, count_sets)
    ctx.log("crowding")
    overlap = (lambda name, scenes: {"overlap share": float(np.mean([s.meta.get("overlap", math.nan) for s in scenes])),
                                     "crowding": float(np.mean([s.meta.get("crowding", math.nan) for s in scenes]))})
    crowd = slice_rows(ctx, model, crowd_sets, overlap)

    columns = ["slice", "n", "true mean", "MAE", "RMSE", "NAE", "bias", "baseline NAE"]
    crowd_columns = columns + (["overlap share"] if ctx.synthetic else ["crowding"])
    plot_files = [
        plots.bar_chart(ctx.out / "error_by_novelty.png", [r["slice"] for r in novelty],
                        {"NAE": [r["NAE"] for r in novelty]}, "relative error by class novelty", "NAE").name,
        plots.xy_chart(ctx.out / "error_vs_count.png",
                       {"MAE": ([r["true mean"] for r in counts], [r["MAE"] for r in counts])},
                       "absolute error against the number of objects", "true count (bin mean, log)", "MAE",
                       log_x=True).name,
        plots.xy_chart(ctx.out / "relative_error_vs_count.png",
                       {"NAE": ([r["true mean"] for r in counts], [r["NAE"] for r in counts])},
                       "relative error against the number of objects", "true count (bin mean, log)", "NAE",
                       log_x=True).name,
        plots.xy_chart(ctx.out / "error_vs_crowding.png",
                       {"NAE": ([r.get("overlap share") if ctx.synthetic else r.get("crowding") for r in crowd],
                                [r["NAE"] for r in crowd])},
                       "relative error against crowding",
                       "share of prompted objects touching another" if ctx.synthetic else "crowding", "NAE").name,
    ]
    report = Report(experiment="generalisation", title="Experiment 5: the limits of zero-shot counting",
                    question=QUESTION)
    novelty_text = ("Unseen words: the synthetic world's every colour and shape word appears in training, so this "
                    "row counts seen-class scenes with synonyms that never appeared in any training text (colour: "
                    + ", ".join(COLOUR_SYNONYMS.values()) + "; shape: " + ", ".join(SHAPE_SYNONYMS.values())
                    + "), alternating an unseen colour word and an unseen shape word."
                    if ctx.synthetic else "FSC-147's val and test classes never appear in its train split.")
    report.sections = [
        Section("Class novelty", novelty_text, [Table("Error by class novelty", columns, novelty)], plot_files[:1]),
        Section("Number of instances", "Bins of the prompted class's count." if not ctx.synthetic else
                "Bins of the requested count of the prompted class (the true count is what was placed).",
                [Table("Error by number of instances", columns, counts)], plot_files[1:3]),
        Section("Crowding", crowd_text, [Table("Error by crowding", crowd_columns, crowd)], plot_files[3:]),
    ]
    report.findings = findings(novelty, counts, crowd, ctx.synthetic)
    report.results = {"novelty": novelty, "count": counts, "crowding": crowd}
    return report


def findings(novelty, counts, crowd, synthetic: bool) -> list[str]:
    out = []
    base = novelty[0]
    for row in novelty[1:]:
        ratio = row["NAE"] / base["NAE"] if base["NAE"] else math.nan
        out.append(f"{row['slice']}: NAE {row['NAE']:.3f} against {base['NAE']:.3f} on {base['slice']} "
                   f"({ratio:.2f}x).")
    if len(counts) >= 2:
        first, last = counts[0], counts[-1]
        out.append(f"From {first['slice']} to {last['slice']} objects the MAE goes from {first['MAE']:.2f} to "
                   f"{last['MAE']:.2f} and the NAE from {first['NAE']:.3f} to {last['NAE']:.3f}; the bias at the "
                   f"top bin is {last['bias']:+.1f} (negative: undercounting).")
    if len(crowd) >= 2:
        first, last = crowd[0], crowd[-1]
        out.append(f"Crowding: NAE {first['NAE']:.3f} at {first['slice']} against {last['NAE']:.3f} at "
                   f"{last['slice']}.")
    return out
