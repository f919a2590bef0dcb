"""Do low-precision counts stay within 0.5% of float32 counts? Measured, on this machine's CPU (or --device).

    python benchmarks/precision.py [--n 20] [--device cpu] [--no-variants] [--out precision.json]

Two models, each counted by `DensityPredictor` at fp32 and at lower precision on the same images:
- the bundled demo model on the counting benchmark's test scenes (clipcount.synthetic.benchmark,
  `--n` scenes of each set: seen, held-out, minority, blank; every prompt of each scene);
- the published model's compat checkpoint, rebuilt by the rule of shared/reference/compat (random
  weights; tests/modeling/official_rule.py), on the compat vectors' four 384x384 images and three
  wide images (their prompts).

A row per set and precision: `auto` (on a CPU with native bf16, the matmuls of
inference.auto_bf16_modules in bf16, everything else float32), `bf16` (everything but the density
head under bf16 autocast) and, unless --no-variants, the choices `auto` was picked against (VARIANTS:
other sets of bf16 modules). Each row: how many counts, the largest and the median relative
difference, the mean signed one (a bias shows there), and whether the largest stays within TARGET.
Relative to the float32 count, or to one object where the count is below one: the absent-class and
blank-image prompts count near 0, where 0.5% of the count would ask for agreement to a few
thousandths of an object. `auto` picks its bf16 modules on the strength of this check: rerun it
after changing the model or the precision policy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import print_table, write_json  # noqa: E402
from clipcount.engine.inference import (  # noqa: E402
    AUTO_ATTENTION_SKIP, AUTO_BF16_MODULES, DensityPredictor, auto_bf16_modules, cpu_has_native_bf16)

TARGET = 0.005  # |low - fp32| / max(fp32, 1 object), every count
COUNT_FLOOR = 1.0  # objects: below it the difference is taken relative to one object
COMPAT = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "compat"
LOW_PRECISIONS = ("auto", "bf16")
TOWER = r"clip\.visual\.transformer\.resblocks\.\d+\."
# other choices of bf16 modules for `auto` (a CPU with native bf16), name -> DensityPredictor(bf16_modules=)
VARIANTS = {
    "auto, attention projections of every layer": rf"{AUTO_BF16_MODULES}|{TOWER}attn",
    "auto, no attention projections": AUTO_BF16_MODULES,
    "image tower MLPs only": rf"{TOWER}mlp",
}
COLUMNS = ("model", "set", "precision", "counts", "fp32 mean", "max rel", "median rel", "mean signed", "target", "ok")

Case = tuple[torch.Tensor, list[str]]  # an image (3, H, W) in [0, 1] and the prompts counted in it


def counts(model, cases: Sequence[Case], precision: str, device: str, bf16_modules: str | None = None) -> list[float]:
    predictor = DensityPredictor(model, stride=min(128, model.config.window_size), device=device, precision=precision,
                                 bf16_modules=bf16_modules)
    return [predictor.count(d) for image, prompts in cases for d in predictor.predict(image, prompts)]


def compare(model, name: str, set_name: str, cases: Sequence[Case], device: str, variants: bool) -> list[dict]:
    """One row per low precision (auto, bf16, and the VARIANTS of auto) against float32 on the same cases."""
    fp32 = np.array(counts(model, cases, "fp32", device))
    runs = {precision: (precision, None) for precision in LOW_PRECISIONS}
    if variants and device == "cpu" and cpu_has_native_bf16():
        runs.update({name: ("auto", modules) for name, modules in VARIANTS.items()})
    return [compare_one(name, set_name, fp32, label, np.array(counts(model, cases, precision, device, modules)))
            for label, (precision, modules) in runs.items()]


def compare_one(name: str, set_name: str, fp32: np.ndarray, precision: str, low: np.ndarray) -> dict:
    signed = (low - fp32) / np.maximum(np.abs(fp32), COUNT_FLOOR)
    worst = float(np.abs(signed).max())
    print(f"  {name} / {set_name} / {precision}: {len(fp32)} counts, max rel {worst:.2e}", flush=True)
    return {"model": name, "set": set_name, "precision": precision, "counts": len(fp32), "fp32 mean": float(fp32.mean()),
            "max rel": f"{worst:.2%}", "median rel": f"{statistics.median(np.abs(signed)):.2%}",
            "mean signed": f"{signed.mean():+.2%}", "target": f"<= {TARGET:.1%}", "ok": "yes" if worst <= TARGET else "NO",
            "fp32": fp32.tolist(), "low": low.tolist(), "max_rel": worst}


def demo_cases(n: int) -> dict[str, list[Case]]:
    from clipcount.synthetic.benchmark import DEFAULT_SEED, SCENE_SETS, make_test_scene

    cases: dict[str, list[Case]] = {}
    for kind in SCENE_SETS:
        for index in range(n):
            scene = make_test_scene(DEFAULT_SEED, kind, index)
            image = torch.from_numpy(scene.image.transpose(2, 0, 1).astype(np.float32) / 255.0)
            cases.setdefault(f"benchmark scenes: {kind}", []).append((image, list(scene.prompts.values())))
    return cases


def compat_model(tmp: Path):
    """The rule-built published checkpoint, converted (None, with a note, when the vectors are absent)."""
    if not COMPAT.is_dir():
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clipcount.modeling.checkpoint import load_model
    from clipcount.modeling.official import convert_official
    from tests.modeling.official_rule import write_official_checkpoint

    ckpt = write_official_checkpoint(tmp / "published.ckpt", extra={"hyper_parameters": {"decoder_head": 4}})
    return load_model(convert_official(ckpt, tmp / "converted"))


def compat_cases() -> dict[str, list[Case]]:
    images = np.random.default_rng(2024).random((4, 3, 384, 384), dtype=np.float32)
    prompts = json.loads((COMPAT / "expected.json").read_text())["prompts"]
    wide = [(torch.from_numpy(np.random.default_rng(c["seed"]).random((1, 3, 384, c["width"]), dtype=np.float32))[0],
             [c["prompt"]]) for c in json.loads((COMPAT / "wide_expected.json").read_text())]
    return {"compat vectors: 384x384": [(torch.from_numpy(i), [p]) for i, p in zip(images, prompts)],
            "compat vectors: wide": wide}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="benchmark scenes of each kind (default 20)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-variants", action="store_true", help="only auto and bf16, not the VARIANTS of auto")
    parser.add_argument("--out", default="precision.json")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; {torch.get_num_threads()} threads", flush=True)
    rows = []
    from clipcount.synthetic.benchmark import load_checkpoint

    demo, _ = load_checkpoint("demo")
    for set_name, cases in demo_cases(args.n).items():
        rows.extend(compare(demo, "demo", set_name, cases, args.device, not args.no_variants))
    with tempfile.TemporaryDirectory(prefix="clipcount-precision-") as tmp:
        published = compat_model(Path(tmp))
        if published is None:
            print(f"note: compat rows skipped, {COMPAT} is not there", flush=True)
        else:
            for set_name, cases in compat_cases().items():
                rows.extend(compare(published, "published (compat)", set_name, cases, args.device, not args.no_variants))
    table = print_table(rows, COLUMNS, title="low-precision counts against float32 counts")
    write_json(args.out, {"benchmark": "precision", "device": args.device, "native_bf16": cpu_has_native_bf16(),
                          "target": TARGET, "count_floor": COUNT_FLOOR, "auto_bf16_modules": {"demo": auto_bf16_modules(len(demo.clip.visual.resblocks)), "vit-b/16": auto_bf16_modules(12)},
                          "auto_attention_skip": AUTO_ATTENTION_SKIP,
                          "rows": rows, "table": table,
                          "ok": all(row["max_rel"] <= TARGET for row in rows if row["precision"] == "auto")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
