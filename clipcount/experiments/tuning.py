"""Experiment 3: how much of the image tower to adapt.

Four arms at the same budget: deep visual prompts (the paper: prompt tokens in the first ~10/12 of
the layers, CLIP frozen), shallow prompts (first layer only), no prompts (CLIP frozen, only the
text context, interaction and decoder train), and full fine-tuning of CLIP's image tower (no
prompts). Reported: trainable parameters, training time and count error.
"""

from __future__ import annotations

from clipcount.experiments import plots
from clipcount.experiments.common import Report, RunContext, Section, Table
from clipcount.experiments.scenes import BASELINE, compare_models, standard_sets
from clipcount.experiments.training import Variant, refuse_model, trained

QUESTION = (
    "CLIP-Count keeps CLIP frozen and adapts its image tower with deep visual prompts (20 tokens in 10 of 12 "
    "layers), arguing that this keeps CLIP's open-vocabulary alignment (so unseen classes can be counted) while "
    "costing few parameters. Against shallow prompts, no prompts and full fine-tuning of the image tower at the "
    "same budget: what does each cost in parameters and time, and what does it do to the error on seen and on "
    "held-out classes?"
)


def variants(ctx: RunContext) -> list[Variant]:
    deep = ctx.budget.deep_layers
    return [
        Variant("paper", description=f"deep visual prompts ({deep} layers), CLIP frozen (the paper)"),
        Variant("shallow-prompts", model={"prompts.visual_layers": 1}, description="visual prompts in the first layer"),
        Variant("no-prompts", model={"prompts.visual_layers": 0}, description="no visual prompts, CLIP frozen"),
        Variant("full-finetune", model={"prompts.visual_layers": 0, "train_image_encoder": True},
                description="CLIP's image tower fine-tuned, no prompts"),
    ]


def run(ctx: RunContext) -> Report:
    refuse_model(ctx)
    arms = variants(ctx)
    models = {v.label: trained(ctx, v) for v in arms}
    sets = standard_sets(ctx)
    ctx.log("counting the test sets")
    count_rows, scores = compare_models(ctx, {k: m.model for k, m in models.items()}, sets)
    set_names = list(sets)
    summary = []
    for arm in arms:
        item = models[arm.label]
        row = {"variant": arm.label, "what trains": arm.description,
               "visual prompt layers": item.model.config.prompts.visual_layers,
               "trainable parameters": item.trainable,
               "trainable share": item.trainable / max(1, item.total),
               "train seconds": item.seconds, "ms/step": 1000 * item.seconds / max(1, item.steps),
               "train CPU seconds": item.cpu_seconds}
        for s in set_names:
            row[f"MAE {s}"] = scores[arm.label][s]["MAE"]
            row[f"NAE {s}"] = scores[arm.label][s]["NAE"]
        summary.append(row)
    baseline = {"variant": BASELINE, "what trains": "nothing: always the training mean"}
    for s in set_names:
        baseline[f"MAE {s}"], baseline[f"NAE {s}"] = scores[BASELINE][s]["MAE"], scores[BASELINE][s]["NAE"]

    plot_files = [
        plots.bar_chart(ctx.out / "error_by_arm.png", set_names,
                        {r["variant"]: [r[f"NAE {s}"] for s in set_names] for r in summary + [baseline]},
                        "relative count error (NAE) by test set", "NAE").name,
        plots.xy_chart(ctx.out / "error_vs_parameters.png",
                       {s: ([r["trainable parameters"] for r in summary], [r[f"NAE {s}"] for r in summary])
                        for s in set_names},
                       "error against trainable parameters", "trainable parameters (log)", "NAE",
                       log_x=True, lines=False,
                       point_labels={s: [r["variant"] for r in summary] for s in set_names[:1]}).name,
    ]
    report = Report(experiment="tuning", title="Experiment 3: visual prompts against fine-tuning", question=QUESTION)
    columns = ["variant", "visual prompt layers", "trainable parameters", "trainable share", "train seconds",
               "ms/step", "train CPU seconds"] + [f"{m} {s}" for s in set_names for m in ("MAE", "NAE")]
    report.sections = [
        Section("Parameters, time and error", "Training seconds are wall time; on shared cores they depend on "
                "what else ran, so the training process's CPU time is given too (data workers not included).",
                [Table("Tuning arms", columns, summary + [baseline])], plot_files),
        Section("Count error", "", [Table("Count error per test set", ["variant", "set", "n", "true mean", "MAE",
                                                                         "RMSE", "NAE", "bias"], count_rows)]),
    ]
    report.findings = findings(summary, set_names, baseline)
    report.results = {"summary": summary, "count_error": scores}
    return report


def findings(summary: list[dict], sets: list[str], baseline: dict) -> list[str]:
    rows = {r["variant"]: r for r in summary}
    out = []
    for s in sets:
        ordered = sorted(summary + [baseline], key=lambda r: r[f"NAE {s}"])
        out.append(f"{s}: ranking by NAE " + " < ".join(f"{r['variant']} ({r[f'NAE {s}']:.3f})" for r in ordered) + ".")
    deep, full = rows.get("paper"), rows.get("full-finetune")
    if deep and full:
        ratio = full["trainable parameters"] / max(1, deep["trainable parameters"])
        out.append(f"Full fine-tuning trains {ratio:.1f}x "
                   f"the parameters of deep prompts and takes {full['ms/step'] / max(1e-9, deep['ms/step']):.2f}x the "
                   "time per step.")
        if len(sets) > 1:
            gap_deep = deep[f"NAE {sets[1]}"] - deep[f"NAE {sets[0]}"]
            gap_full = full[f"NAE {sets[1]}"] - full[f"NAE {sets[0]}"]
            out.append(f"Gap {sets[1]} - {sets[0]} in NAE: deep prompts {gap_deep:+.3f}, full fine-tuning "
                       f"{gap_full:+.3f} (the paper's argument predicts a larger gap for full fine-tuning).")
    return out
