"""Shared output of every benchmark: one plain-text table on stdout and a JSON file beside it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipcount.environment import machine_info


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> str:
    """Rows of dicts -> an aligned text table (printed and returned)."""
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has no such numbers."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write results with machine facts, atomically, so runs can be compared."""
    from clipcount.engine.metrics import write_json_atomic

    path = Path(path)
    payload = {"machine": machine_info(), **data}
    write_json_atomic(payload, path)
    print(f"wrote {path}", flush=True)
    return path
