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
