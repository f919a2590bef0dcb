"""Rebuilds the published checkpoint of `shared/reference/compat/` by its README's rule (no published code)."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch

REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference"


def canonical(key: str) -> str:
    for old, new in (("model.img_encoder.vit.", "model.clip.visual."), ("model.text_encoder.clip_model.", "model.clip.")):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def rule_tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(canonical(key).encode()))
    if not shape:
        return np.array(np.float32(math.log(1 / 0.07)))
    n = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        return np.float32(1) + np.float32(0.1) * n if key.endswith(".weight") else np.float32(0.02) * n
    return (n.astype(np.float64) / math.sqrt(math.prod(shape[1:]))).astype(np.float32)


def read_key_list(path: Path = REFERENCE / "official_state_dict.tsv") -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in path.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        rows.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return rows


def write_official_checkpoint(path: Path, extra: dict | None = None) -> Path:
    state = {key: torch.from_numpy(rule_tensor(key, shape).copy()) for key, shape in read_key_list()}
    torch.save({"state_dict": state, **(extra or {})}, path)
    return path


# ---- the released form: no CLIP tensors in the checkpoint, CLIP as a separate file ----------------

CLIP_PREFIXES = ("model.clip.", "model.img_encoder.vit.", "model.text_encoder.clip_model.")


def rule_state() -> dict[str, torch.Tensor]:
    """Every tensor of the published state dict, by the rule (shared CLIP copies are equal)."""
    return {key: torch.from_numpy(rule_tensor(key, shape).copy()) for key, shape in read_key_list()}


def without_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the published run.py saves: every frozen CLIP key dropped (about 85 keys remain)."""
    return {k: v for k, v in state.items() if not k.startswith(CLIP_PREFIXES)}


def clip_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `model.clip.*` tensors under OpenAI's (and OpenCLIP's) names."""
    return {k[len("model.clip."):]: v for k, v in state.items() if k.startswith("model.clip.")}


def write_clip_folder(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """The rule's CLIP as an OpenCLIP hub folder (OpenAI's tensor names, QuickGELU said in its config);
    its weights file alone is a bare OpenAI-layout state dict."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(clip_part(state), folder / "open_clip_pytorch_model.bin")
    model_cfg = {"embed_dim": 512, "quick_gelu": True,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return folder


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], hyper_parameters=None, **extra) -> Path:
    """A Lightning-style file: state_dict, hyper_parameters (any container) and other entries."""
    payload = {"state_dict": state, **extra}
    if hyper_parameters is not None:
        payload["hyper_parameters"] = hyper_parameters
    torch.save(payload, path)
    return path
