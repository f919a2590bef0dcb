"""The bundled demo model: copying a recipe run's model into the package, and its example scene."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipcount.config import ClipCountConfig
from clipcount.errors import CheckpointError, ConfigError
from clipcount.report import json_safe
from clipcount.synthetic.world import WorldConfig

EXAMPLE_SEED = 31_000_000  # the bundled example scene
REPORT_JSON = "report.json"

EXAMPLE_CLASSES = {  # several classes, one of them held out (green triangles)
    ("green", "triangle"): 14,
    ("red", "circle"): 30,
    ("blue", "square"): 9,
    ("yellow", "star"): 22,
}


def render_example(path: str | os.PathLike, seed: int = EXAMPLE_SEED, width: int = 640) -> dict[str, int]:
    """Write the example scene (JPEG) and return the true count of each class in it by prompt."""
    from PIL import Image

    from clipcount.synthetic.prompts import format_prompt
    from clipcount.synthetic.world import make_scene

    world = WorldConfig(mode="test", min_width=width, max_width=width, max_size=40.0, min_size=12.0)
    scene = make_scene(np.random.default_rng(seed), world, dict(EXAMPLE_CLASSES), width=width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene.image).save(path, "JPEG", quality=95, subsampling=0)
    return {format_prompt(c, s): n for (c, s), n in sorted(scene.class_counts().items())}


def export_demo(run_dir: str | os.PathLike, assets_dir: str | os.PathLike, dtype: str = "float16",
                source: str = "main") -> dict[str, Any]:
    """Copy a recipe run's model into `assets_dir`/demo (weights cast to `dtype`, float16 keeps the
    file under 16 MB; loading casts back to float32) and render `assets_dir`/example.jpg.

    Returns {"folder", "bytes", "example", "counts"}; the example's true counts are also recorded
    in the demo's config.json under "example".
    """
    from safetensors.torch import load_file, save_file

    run_dir, assets_dir = Path(run_dir), Path(assets_dir)
    source_folder = run_dir / source / "final" if (run_dir / source / "final").is_dir() else run_dir
    weights, config = source_folder / "model.safetensors", source_folder / "config.json"
    if not weights.is_file() or not config.is_file():
        raise CheckpointError(f"{source_folder} holds no trained model (model.safetensors + config.json)")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ConfigError(f"export dtype must be float16, bfloat16 or float32, got {dtype!r}")
    target_dtype = getattr(torch, dtype)
    state = {k: (v.to(target_dtype) if v.is_floating_point() else v).contiguous()
             for k, v in load_file(str(weights)).items()}
    target = assets_dir / "demo"
    target.mkdir(parents=True, exist_ok=True)
    counts = render_example(assets_dir / "example.jpg")
    data = json.loads(config.read_text(encoding="utf-8"))
    data.pop("training", None)  # the trainer's bookkeeping is not part of the bundled model
    data["synthetic"] = {**data.get("synthetic", {}), "weights_dtype": dtype}
    data["example"] = {"file": "example.jpg", "seed": EXAMPLE_SEED, "counts": counts}
    report = run_dir / REPORT_JSON
    if report.is_file():
        payload = json.loads(report.read_text(encoding="utf-8"))
        results = payload.get("results", {}).get(source, {})
        data["benchmark"] = {row: {k: r["model"].get(k) for k in ("mae", "rmse", "nae", "bias", "pred_mean")}
                             for row, r in results.items() if isinstance(r, dict) and "model" in r}
        recipe = payload.get("recipe", {})
        reused = recipe.get("stages", {}).get("pretrain", {}).get("reused_from")
        command = f"clipcount synthetic recipe OUT --preset {recipe.get('preset')}"
        command += f" --reuse-clip {Path(reused).name}" if reused else ""
        seed = _train_seed(run_dir)
        command += f" --seed {seed}" if seed else ""
        data["recipe"] = {"command": command,
                          "wall_seconds": recipe.get("total_seconds"),
                          "stages": {k: v.get("seconds") for k, v in recipe.get("stages", {}).items()},
                          "machine": payload.get("machine"), "benchmark_seed": payload.get("seed"),
                          "benchmark_n": payload.get("n"), "train_mean": payload.get("train_mean")}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(json_safe(data), indent=2), encoding="utf-8")
    for path in (target / "model.safetensors", target / "config.json", assets_dir / "example.jpg"):
        os.chmod(path, 0o644)  # package data: readable by everyone who installs it
    size = (target / "model.safetensors").stat().st_size
    return {"folder": str(target), "bytes": size, "example": str(assets_dir / "example.jpg"), "counts": counts}


def _train_seed(run_dir: Path) -> int | None:
    """The CLIP-Count seed a recipe run recorded (None when it recorded none)."""
    from clipcount.synthetic.recipe import STATE_FILE

    path = run_dir / STATE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("preset", {}).get("train", {}).get("seed")


def model_size_mb(cfg: ClipCountConfig, bytes_per_value: int = 2) -> float:
    """The size of a checkpoint's weights in MB (float16 by default), without building the model."""
    from clipcount.modeling.clip_count import ClipCount

    with torch.device("meta"):
        model = ClipCount(copy.deepcopy(cfg))
    return sum(v.numel() for v in model.state_dict().values()) * bytes_per_value / 1e6
