"""Named models: what `--model NAME` and `Counter.from_pretrained(NAME)` mean.

- "demo": a small model bundled with the package so that counting works out of the box, offline.
  It was trained on synthetic shapes (clipcount's synthetic world), not on real photos, so it says
  so once per process when it is used.
- "published": the released CLIP-Count checkpoint (trained on FSC-147), for real photos. Downloaded
  and converted on first use, then cached (clipcount.published).
Anything that is not a registered name is a checkpoint path or a Hugging Face hub id, resolved by
`checkpoint.resolve_checkpoint`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipcount.errors import CheckpointError

DEFAULT_MODEL = "demo"

# Where the bundled model lives (model.safetensors + config.json, the clipcount checkpoint layout).
ASSETS = Path(__file__).resolve().parent / "assets"

# Checkpoints of other programs that people may pass by mistake: they need converting first.
_FOREIGN_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")

REAL_WEIGHTS_HINT = (
    "for real photos use `--model published` (or Counter.from_pretrained('published')): the released "
    "CLIP-Count, downloaded and converted on first use; or convert a CLIP-Count checkpoint with "
    "`clipcount convert-official CKPT OUT` and pass `--model OUT`, or any clipcount checkpoint folder or hub id"
)


class DemoModelWarning(UserWarning):
    """The bundled demo model is in use; it was not trained on real photos.

    A category of its own so that it can be shown once per process (the filter below) and so that
    callers can silence or capture it precisely.
    """


# Shown once per process wherever it is raised from. Appended, so a filter of the application's
# own (`-W`, `warnings.simplefilter`) still takes precedence.
warnings.filterwarnings("once", category=DemoModelWarning, append=True)


@dataclass(frozen=True)
class NamedModel:
    """A model shipped with or known to clipcount by name."""

    name: str
    folder: Path | None  # bundled models: where they are; None for models fetched on first use
    description: str
    synthetic_only: bool  # trained on synthetic images only: warn that real photos are out of scope
    fetch: Callable[[], Path] | None = None  # downloads (first use) and returns the model's folder


REGISTRY: dict[str, NamedModel] = {
    "demo": NamedModel(
        name="demo",
        folder=ASSETS / "demo",
        description="a small CLIP-Count trained on synthetic shapes, bundled for trying clipcount out",
        synthetic_only=True,
    ),
    "published": NamedModel(
        name="published",
        folder=None,
        description="the released CLIP-Count checkpoint (FSC-147), converted; downloaded on first use",
        synthetic_only=False,
        fetch=lambda: _fetch_published(),
    ),
}


def _fetch_published() -> Path:
    from clipcount.published import ensure_published

    return ensure_published()


def resolve_model(source: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """A model name, checkpoint folder/file or hub id -> the local checkpoint folder.

    Hub ids are downloaded (needs network). Raises CheckpointError with what to do otherwise.
    """
    from clipcount.modeling.checkpoint import resolve_checkpoint

    named = REGISTRY.get(str(source))
    if named is not None:
        return _named_folder(named)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in _FOREIGN_SUFFIXES:
        raise CheckpointError(
            f"{path} is not a clipcount checkpoint; if it is the published CLIP-Count checkpoint, "
            f"convert it first: `clipcount convert-official {path} OUT_FOLDER`, then use OUT_FOLDER"
        )
    return resolve_checkpoint(source)


def _named_folder(named: NamedModel) -> Path:
    from clipcount.modeling.checkpoint import CONFIG_NAME, WEIGHTS_NAME

    if named.fetch is not None:
        return named.fetch()
    if not (named.folder / WEIGHTS_NAME).is_file() or not (named.folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"the bundled {named.name!r} model is not installed in this copy of clipcount "
            f"(expected {named.folder / WEIGHTS_NAME}); reinstall clipcount, or {REAL_WEIGHTS_HINT}"
        )
    return named.folder


def is_synthetic_only(source: str | os.PathLike) -> bool:
    named = REGISTRY.get(str(source))
    return named is not None and named.synthetic_only


def warn_if_demo(source: str | os.PathLike, stacklevel: int = 3) -> None:
    """Tell people, once per process, that the demo model does not count real photos well."""
    if is_synthetic_only(source):
        warnings.warn(demo_notice(), DemoModelWarning, stacklevel=stacklevel)


# What the CLI says, once, after the results of a run with the demo model (the warning above is
# for Python callers, who read it once in a log rather than on every run).
DEMO_NOTE = "note: the demo model knows synthetic shapes only; for photos use --model published"


def demo_notice() -> str:
    return (
        "using the bundled demo model, trained on synthetic shapes, not real photos: "
        f"counts on photos are not meaningful; {REAL_WEIGHTS_HINT}"
    )
