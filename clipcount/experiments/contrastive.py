"""Experiment 1: with and without the patch-text contrastive stage, at the same number of steps.

Measured: count error on the standard test sets, and the patch features' agreement with the text.
For window crops of test scenes, each patch is labelled positive when it holds a prompted object's
centre mass (the contrastive loss's own definition), and scored two ways:
- the contrastive head: cosine similarity between `patch_feat_proj_contrast(patch tokens)` and the
  text embedding, what the contrastive loss trains and what the paper's similarity maps show. In the
  arm without the stage this head is never trained, so its numbers there are a control (a random
  projection of the same tokens), not the arm's quality;
- the density head: the predicted density mass in each patch, the quality that matters for
  counting, fair to both arms.
Each gives the mean on positive and on negative patches, their separation (difference, and d' =
difference / pooled standard deviation) and the ROC-AUC of the score as a per-patch object
detector.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipcount.engine.losses import positive_patch_mask
from clipcount.experiments import plots
from clipcount.experiments.common import Report, RunContext, Section, Table, percent_change
from clipcount.experiments.scenes import BASELINE, compare_models, roc_auc, standard_sets, window_crops
from clipcount.experiments.training import Variant, refuse_model, trained
from clipcount.modeling.clip_count import ClipCount

QUESTION = (
    "CLIP-Count first trains with a patch-text contrastive loss alone (20 of 200 epochs), so that the "
    "prompted image tower's patches that hold the named objects become similar to the text, and only then "
    "with the density loss; the paper credits this stage with better localisation and lower error (its "
    "ablation) and shows patch-text similarity maps. Here both arms get the same number of training steps: "
    "the paper's schedule, and the density loss for all steps. Does the stage lower the count error, and "
    "does it make patches with objects more similar to the text than patches without?"
)


PATCH_TEXT = (
    "Window crops of the test scenes; a patch is positive when it holds a prompted object's centre (the "
    "contrastive loss's own labels). Two scores per patch: the contrastive head's cosine similarity to the text "
    "(what the paper's similarity maps show; untrained in the arm without the stage, so there it is a control: "
    "a random projection of the same tokens), and the predicted density mass in the patch (fair to both arms). "
    "Separation = positive mean - negative mean; d' = separation / pooled standard deviation; ROC-AUC = the "
    "score as a per-patch object detector."
)


def variants(ctx: RunContext) -> list[Variant]:
    budget = ctx.budget
    total = budget.contrastive_epochs + budget.density_epochs
    return [
        Variant("paper", description="contrastive stage, then the density stage (the paper)"),
        Variant("no-contrastive", train={"contrastive_epochs": 0, "density_epochs": total},
                description="the density loss for every step (same number of steps)"),
    ]


@torch.inference_mode()
def patch_scores(model: ClipCount, crops: list[dict[str, Any]], batch: int = 16) -> dict[str, np.ndarray]:
    """Per patch of every crop: similarity (contrastive head), density mass, positive label;
    plus the maps of each crop, (K, h, w)."""
    model = model.eval()
    device = next(model.parameters()).device
    sims, masses, labels = [], [], []
    for first in range(0, len(crops), batch):
        chunk = crops[first:first + batch]
        images = torch.stack([c["image"] for c in chunk]).to(device)  # (B, 3, S, S)
        density = torch.stack([c["density"] for c in chunk]).to(device)  # (B, 1, S, S)
        prompts = [c["prompt"] for c in chunk]
        tokens = model.encode_image(images)  # (B, N, Cv)
        text = model.encode_text(prompts)  # (B, 1, E)
        grid = int(math.isqrt(tokens.shape[1]))
        sims.append(F.cosine_similarity(model.contrastive_features(tokens).float(), text.float(), dim=-1))  # (B, N)
        predicted = model.density_from_features(tokens, text, images.shape[-2:]).float()  # (B, 1, S, S)
        masses.append(F.adaptive_avg_pool2d(predicted, grid).flatten(1))  # (B, N): mean density per patch
        labels.append(positive_patch_mask(density, (grid, grid), pool=model.config.clip.vision.patch_size))
    grid = int(math.isqrt(sims[0].shape[1]))
    sim = torch.cat(sims).cpu().numpy()
    return {"similarity": sim, "mass": torch.cat(masses).cpu().numpy(), "positive": torch.cat(labels).cpu().numpy(),
            "grid": np.array(grid)}


def separation(scores: np.ndarray, positive: np.ndarray) -> dict[str, float]:
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return {"positive mean": math.nan, "negative mean": math.nan, "separation": math.nan, "d'": math.nan,
                "ROC-AUC": math.nan}
    pooled = math.sqrt(0.5 * (pos.var() + neg.var())) or math.nan
    return {"positive mean": float(pos.mean()), "negative mean": float(neg.mean()),
            "separation": float(pos.mean() - neg.mean()), "d'": float((pos.mean() - neg.mean()) / pooled),
            "ROC-AUC": roc_auc(pos, neg)}


def run(ctx: RunContext) -> Report:
    refuse_model(ctx)
    models = {v.label: trained(ctx, v) for v in variants(ctx)}
    sets = standard_sets(ctx)
    ctx.log("counting the test sets")
    count_rows, scores = compare_models(ctx, {k: m.model for k, m in models.items()}, sets)

    ctx.log("measuring patch-text similarity")
    per_set = max(1, ctx.budget.similarity_images // max(1, len(sets)))
    crop_sources = [s for scenes in sets.values() for s in scenes[:per_set]]
    window = next(iter(models.values())).model.config.window_size
    crops = window_crops(ctx, crop_sources, len(crop_sources), size=window)
    feature_rows, feature_results, maps = [], {}, {}
    for label, item in models.items():
        patches = patch_scores(item.model, crops)
        maps[label] = patches
        positive = patches["positive"].astype(bool)
        for head, key in (("contrastive head (cosine)", "similarity"), ("density head (mass per patch)", "mass")):
            stats = separation(patches[key], positive)
            feature_results.setdefault(label, {})[key] = stats
            feature_rows.append({"variant": label, "score": head, **stats,
                                 "patches": int(positive.size), "positive share": float(positive.mean())})

    plot_files = [
        draw_similarity_maps(ctx, crops, maps, models),
        plots.bar_chart(ctx.out / "count_error.png", list(sets),
                        {label: [scores[label][s]["MAE"] for s in sets] for label in scores},
                        "count error (MAE) by test set", "MAE").name,
    ]
    report = Report(experiment="contrastive", title="Experiment 1: the patch-text contrastive stage", question=QUESTION)
    report.sections = [
        Section("Training", "Both arms train the same number of steps from the same CLIP and seed.", [Table(
            "Training runs", ["variant", "steps", "train seconds", "trainable parameters"],
            [{"variant": k, "steps": m.steps, "train seconds": m.seconds, "trainable parameters": m.trainable}
             for k, m in models.items()])]),
        Section("Count error", "", [Table("Count error per test set", ["variant", "set", "n", "true mean", "MAE",
                                                                         "RMSE", "NAE", "bias"], count_rows)],
                [plot_files[1]]),
        Section("Patch features", PATCH_TEXT, [Table(
            "Patches with vs without objects", ["variant", "score", "positive mean", "negative mean", "separation",
                                                "d'", "ROC-AUC", "patches", "positive share"], feature_rows)],
                [plot_files[0]]),
    ]
    report.findings = findings(scores, feature_results, list(sets))
    report.results = {"count_error": scores, "patch_features": feature_results,
                      "training": {k: {"seconds": m.seconds, "steps": m.steps, "trainable": m.trainable}
                                   for k, m in models.items()}}
    return report


def draw_similarity_maps(ctx: RunContext, crops, maps, models) -> str:
    """A few crops: the image, the positive patches, and each arm's similarity and density maps."""
    grid = int(next(iter(maps.values()))["grid"])
    rows = []
    for i in range(min(4, len(crops))):
        image = (crops[i]["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        label_map = next(iter(maps.values()))["positive"][i].reshape(grid, grid).astype(float)
        row = [(crops[i]["prompt"], image), ("object patches", plots.overlay(image, label_map))]
        for label in models:
            similarity = maps[label]["similarity"][i].reshape(grid, grid)
            row.append((f"{label}: similarity", plots.overlay(image, similarity)))
        first = next(iter(models))
        row.append((f"{first}: density", plots.overlay(image, maps[first]["mass"][i].reshape(grid, grid))))
        rows.append(row)
    path = plots.map_grid(ctx.out / "similarity_maps.png", rows,
                          "patch-text cosine similarity (contrastive head) over the crop, each map scaled to "
                          "its own range (blue low, yellow high)")
    return path.name


def findings(scores, features, sets: list[str]) -> list[str]:
    out = []
    for s in sets:
        a, b, c = scores["paper"][s], scores["no-contrastive"][s], scores[BASELINE][s]
        out.append(f"{s}: MAE {a['MAE']:.2f} (NAE {a['NAE']:.3f}) with the contrastive stage, {b['MAE']:.2f} "
                   f"(NAE {b['NAE']:.3f}) without: {percent_change(b['MAE'], a['MAE'])} MAE with the stage; "
                   f"always answering the training mean gives MAE {c['MAE']:.2f} (NAE {c['NAE']:.3f}).")
    sim = features["paper"]["similarity"]
    ctrl = features["no-contrastive"]["similarity"]
    d_prime = sim["d'"]
    out.append(f"Contrastive head: patches with objects score {sim['positive mean']:.3f} against "
               f"{sim['negative mean']:.3f} without (ROC-AUC {sim['ROC-AUC']:.3f}, d' {d_prime:.2f}); the "
               f"untrained head of the other arm gives ROC-AUC {ctrl['ROC-AUC']:.3f} (control).")
    da, db = features["paper"]["mass"], features["no-contrastive"]["mass"]
    out.append(f"Density head as a patch detector: ROC-AUC {da['ROC-AUC']:.3f} with the stage, "
               f"{db['ROC-AUC']:.3f} without.")
    return out
