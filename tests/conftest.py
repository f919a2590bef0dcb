"""Fixtures shared by all tests: a tiny random checkpoint, and images written on demand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clipcount checkpoint folder of a randomly initialised tiny model (64-pixel windows), its
    density head started at a small positive density (as training starts it) so that counts are
    positive and vary a little with the image, as a trained model's do."""
    import torch

    from clipcount.config import tiny_config
    from clipcount.engine.head_init import init_density_head
    from clipcount.modeling.checkpoint import save_model
    from clipcount.modeling.clip_count import ClipCount

    torch.manual_seed(0)
    model = ClipCount(tiny_config())
    init_density_head(model, 0.05)
    return save_model(model, tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_counter(tiny_checkpoint: Path):
    """A CPU float32 Counter over the tiny checkpoint, shared (it holds no per-test state)."""
    from clipcount.api import Counter

    return Counter.from_pretrained(tiny_checkpoint, device="cpu", precision="fp32")


def _blob_image(height: int = 96, width: int = 128, blobs: int = 5, seed: int = 0) -> np.ndarray:
    """A (H, W, 3) uint8 picture: bright discs on a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = rng.normal(40, 8, size=(height, width, 3))
    for _ in range(blobs):
        cy, cx = rng.uniform(8, height - 8), rng.uniform(8, width - 8)
        disc = (ys - cy) ** 2 + (xs - cx) ** 2 <= 25
        image[disc] = rng.uniform(150, 255, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def blob_image() -> Callable[..., np.ndarray]:
    """blob_image(height=96, width=128, blobs=5, seed=0) -> (H, W, 3) uint8 picture of bright discs."""
    return _blob_image


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """make_image(path, height=96, width=128, seed=0) -> path: a small picture in the path's format."""

    def write(path: Path, height: int = 96, width: int = 128, seed: int = 0) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_blob_image(height, width, seed=seed)).save(path)
        return path

    return write
