"""clipcount checkpoints: `model.safetensors` + `config.json` in one folder (the Hugging Face layout).

Loading is strict (every key present, every shape right) and never unpickles anything.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from clipcount.config import ClipCountConfig
from clipcount.errors import CheckpointError, ConfigError
from clipcount.modeling.clip_count import ClipCount
from clipcount.modeling.weights import load_state_strict

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_model(model: ClipCount, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write weights and config atomically: a reader never sees a half-written checkpoint."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = {"clipcount": model.config.to_dict(), **(extra or {})}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        Path(tmp, CONFIG_NAME).write_text(json.dumps(config, indent=2))
        os.replace(os.path.join(tmp, WEIGHTS_NAME), folder / WEIGHTS_NAME)
        os.replace(os.path.join(tmp, CONFIG_NAME), folder / CONFIG_NAME)
    return folder


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A clipcount checkpoint folder, its weights file, or a Hugging Face hub id (downloaded)."""
    if not str(source).strip():
        raise CheckpointError("no model given; pass a model name (demo), a checkpoint folder or a hub id")
    path = Path(source).expanduser()
    if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME):
        path = path.parent
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"{path} is not a clipcount checkpoint (needs {WEIGHTS_NAME} and {CONFIG_NAME}); "
                "convert the published checkpoint with `clipcount convert-official`"
            )
        return path
    if path.exists():
        raise CheckpointError(f"{path} is not a clipcount checkpoint; give its folder (with {WEIGHTS_NAME} and {CONFIG_NAME})")
    if looks_like_path(source):
        raise CheckpointError(f"checkpoint folder {source} not found; check the path (a checkpoint is made by "
                              "`clipcount convert-official` or `clipcount train`)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        return _download(str(source))
    raise CheckpointError(f"checkpoint {source!r} not found: give a folder, or a hub id like user/model")


# File endings of weights and configs: a name ending so is a file path, not a hub id.
_FILE_SUFFIXES = (".safetensors", ".json", ".ckpt", ".pth", ".pt", ".bin", ".zip", ".tar", ".gz")


def looks_like_path(source: str | os.PathLike) -> bool:
    """Whether a model argument that exists nowhere was meant as a local path, not a hub id.

    A hub id is exactly `owner/name`. Anything else with a separator (absolute, ./ ~/ or more
    parts), a file ending, or a first part that exists here (e.g. `weights/` before the model was
    converted into it) is a path: it gets "no such folder" at once, not a minute of network retries.
    """
    if not isinstance(source, str):
        return True  # a Path object
    text = source.strip()
    parts = text.replace("\\", "/").split("/")
    return (
        "\\" in text or text.startswith(("/", "~", "."))
        or text.endswith("/") or len(parts) > 2 or text.lower().endswith(_FILE_SUFFIXES)
        or (len(parts) == 2 and Path(parts[0]).exists())
    )


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, if that is plain at once (no name resolution); else None.

    huggingface_hub retries failed requests for about a minute; without a network that only
    delays the answer."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None  # offline mode reads the local cache; let it
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"cannot resolve {host}: no network"
    return None


def _download(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download

    reason = _hub_unreachable()
    if reason is not None:
        raise CheckpointError(f"{repo_id!r} is no local folder, and the Hugging Face hub cannot be reached to "
                              f"download it ({reason}); check the path, or connect to the network")
    try:
        weights = hf_hub_download(repo_id, WEIGHTS_NAME)
        hf_hub_download(repo_id, CONFIG_NAME)
    except Exception as error:  # noqa: BLE001 - hub errors vary by version
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(error).__name__}); "
            "check the id and your network, or pass a local folder"
        ) from None
    return Path(weights).parent


def read_config(folder: Path) -> tuple[ClipCountConfig, dict]:
    """The model config of a checkpoint folder, validated: an impossible setting is refused here,
    naming it, rather than crashing the first count."""
    try:
        data = json.loads((folder / CONFIG_NAME).read_text())
        return ClipCountConfig.from_dict(data["clipcount"]), data
    except ConfigError as error:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {error}; fix it or save the checkpoint again") from None
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{folder / CONFIG_NAME} is not a clipcount config ({error})") from None


def load_model(source: str | os.PathLike, map_location: str | torch.device = "cpu") -> ClipCount:
    """Build the model its config describes and fill it strictly from its safetensors weights."""
    from safetensors.torch import load_file

    folder = resolve_checkpoint(source)
    config, _ = read_config(folder)
    with torch.device("meta"):  # no random initialisation of weights that are overwritten next
        model = ClipCount(config)
    try:
        state = load_file(str(folder / WEIGHTS_NAME), device=str(map_location))
    except Exception as error:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{folder / WEIGHTS_NAME} is not a readable safetensors file ({error})") from None
    load_state_strict(model, state, str(folder / WEIGHTS_NAME), assign=True)
    model.set_constant_buffers(map_location)
    model.freeze_clip()
    return model.eval()
