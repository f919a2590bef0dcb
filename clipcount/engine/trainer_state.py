"""Trainer state (optimizer, scheduler, RNG, position) on disk without pickle.

Nested Python state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) is split in two:
the tensors and arrays go to `trainer_state.safetensors` under generated names, everything else to
`trainer_state.json`, where each tensor is replaced by a reference to its name. Structure that JSON
cannot say directly is tagged so it comes back exactly:

    {"$tensor": name}            a torch tensor (dtype and shape live in the safetensors file)
    {"$ndarray": name}           a numpy array (stored as a tensor; restored with numpy's dtype)
    {"$tuple": [...]}            a tuple
    {"$items": [[key, value]]}   a dict whose keys are not all strings (optimizer state is keyed by int)
    {"$bytes": "hex"}            bytes

Reading never executes anything from the files: a damaged or foreign state raises CheckpointError.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipcount.errors import CheckpointError

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
FORMAT_VERSION = 1

_TAGS = ("$tensor", "$ndarray", "$tuple", "$items", "$bytes")


def pack(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Nested state -> (JSON-able structure, {name: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def visit(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous().clone()
            return {"$tensor": path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value).copy())
            return {"$ndarray": path, "dtype": value.dtype.str}
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, bytes):
            return {"$bytes": value.hex()}
        if isinstance(value, tuple):
            return {"$tuple": [visit(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [visit(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: visit(v, f"{path}.{k}") for k, v in value.items()}
            return {"$items": [[visit(k, f"{path}.key{i}"), visit(v, f"{path}.{i}")]
                               for i, (k, v) in enumerate(value.items())]}
        raise TypeError(f"cannot store {type(value).__name__} at {path!r} in trainer state (no pickle)")

    return visit(obj, "state"), tensors


def unpack(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `pack`."""
    if isinstance(data, list):
        return [unpack(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "$tensor" in data:
        return _tensor(tensors, data["$tensor"])
    if "$ndarray" in data:
        return _tensor(tensors, data["$ndarray"]).numpy().astype(np.dtype(data["dtype"]), copy=False)
    if "$tuple" in data:
        return tuple(unpack(v, tensors) for v in data["$tuple"])
    if "$items" in data:
        return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in data["$items"]}
    if "$bytes" in data:
        return bytes.fromhex(data["$bytes"])
    return {k: unpack(v, tensors) for k, v in data.items()}


def save_trainer_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` as trainer_state.safetensors + trainer_state.json into `folder` (which exists).

    Not atomic by itself: the trainer writes into a fresh folder and swaps the folder in.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    structure, tensors = pack(state)
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": "pt"})
    text = json.dumps({"format_version": FORMAT_VERSION, "state": structure}, indent=1)
    (folder / STATE_JSON).write_text(text, encoding="utf-8")


def load_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    """Read what `save_trainer_state` wrote; CheckpointError naming the file if anything is off."""
    from safetensors.torch import load_file

    folder = Path(folder)
    json_path, tensor_path = folder / STATE_JSON, folder / STATE_TENSORS
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise CheckpointError(f"{path} not found: {folder} holds model weights but no trainer state to resume from")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_path))
    except Exception as error:  # noqa: BLE001 - json and safetensors raise several types
        raise CheckpointError(f"trainer state in {folder} is unreadable ({error}); resume from another checkpoint") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{json_path} is not a clipcount trainer state (version {FORMAT_VERSION})")
    try:
        return unpack(data["state"], tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{json_path} is damaged ({error}); resume from another checkpoint") from None


def _tensor(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise KeyError(f"tensor {name!r} missing from {STATE_TENSORS}")
    return tensors[name]


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
