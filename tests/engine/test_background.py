"""Background crops: parts of a training image with no annotated object, trained on with all-zero
targets, so that a fine-tune learns that empty background counts 0 (data/background.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipcount.cli import main
from clipcount.config import FINETUNE_DEFAULTS, TrainConfig
from clipcount.data import CountingSample, FolderDataset, TrainingDataset
from clipcount.data.background import empty_square
from clipcount.errors import ConfigError


def _brute_force_side(points: np.ndarray, height: int, width: int, margin: int) -> int:
    """The largest side of a square with no point's pixel within `margin` of it, by trying all."""
    best = 0
    cells = np.floor(points).astype(int)
    for side in range(1, min(height, width) + 1):
        for y0 in range(height - side + 1):
            for x0 in range(width - side + 1):
                near = ((cells[:, 0] >= x0 - margin) & (cells[:, 0] < x0 + side + margin)
                        & (cells[:, 1] >= y0 - margin) & (cells[:, 1] < y0 + side + margin))
                if not near.any():
                    best = side
                    break
            if best == side:
                break
    return best


@pytest.mark.parametrize("seed", range(4))
def test_the_empty_square_is_the_largest_with_nothing_near_it(seed):
    rng = np.random.default_rng(seed)
    height, width, margin = 24, 31, 2
    points = rng.uniform(0, [width, height], size=(int(rng.integers(1, 8)), 2))
    x0, y0, side = empty_square(points, height, width, 1, margin, rng)
    assert side == _brute_force_side(points, height, width, margin)
    assert 0 <= x0 and x0 + side <= width and 0 <= y0 and y0 + side <= height
    cells = np.floor(points)
    assert not ((cells[:, 0] >= x0 - margin) & (cells[:, 0] < x0 + side + margin)
                & (cells[:, 1] >= y0 - margin) & (cells[:, 1] < y0 + side + margin)).any()


def test_a_crowded_image_has_no_background_square():
    ys, xs = np.mgrid[0:64:6, 0:64:6]
    grid = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32) + 0.5
    assert empty_square(grid, 64, 64, min_side=8, margin=2, rng=np.random.default_rng(0)) is None


def _crowded_left(height: int = 64, width: int = 160) -> CountingSample:
    """Bright dots in the left quarter of a textured image; the rest holds nothing annotated."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.3, size=(height, width, 3)).astype(np.float32)
    points = np.stack([rng.uniform(2, width / 4, 12), rng.uniform(2, height - 2, 12)], 1)
    for x, y in points:
        image[int(y) - 1:int(y) + 2, int(x) - 1:int(x) + 2] = 1.0
    return CountingSample(image, points, "dots", "left.png")


def test_background_crops_hold_no_object_and_have_all_zero_targets():
    sample = _crowded_left()
    data = TrainingDataset([sample], crop_size=64, density_sigma=1.0, background_share=1.0)
    for epoch in range(5):
        data.set_epoch(epoch)
        item = data[0]
        assert item["count"] == 0.0 and float(item["density"].abs().max()) == 0.0
        assert item["image"].shape == (3, 64, 64)
        assert 0.1 <= float(item["image"].min()) and float(item["image"].max()) <= 0.3 + 1e-4  # the image, no dot


def test_without_a_share_items_are_as_before():
    sample = _crowded_left()
    plain = TrainingDataset([sample], crop_size=64, seed=3)[0]
    zero = TrainingDataset([sample], crop_size=64, seed=3, background_share=0.0)[0]
    assert plain["count"] == zero["count"] > 0 and bool((plain["image"] == zero["image"]).all())
    with pytest.raises(ConfigError, match="between 0 and 1"):
        TrainingDataset([sample], crop_size=64, background_share=1.5)
    # an image crowded everywhere has no background square: its items stay ordinary
    ys, xs = np.mgrid[0:64:6, 0:64:6]
    crowded = CountingSample(sample.image[:, :64], np.stack([xs.ravel(), ys.ravel()], 1) + 0.5, "dots", "full.png")
    assert TrainingDataset([crowded], crop_size=64, background_share=1.0)[0]["count"] > 0


def test_fine_tuning_trains_on_background_crops_by_default(tiny_checkpoint, tmp_path, monkeypatch):
    """`train --init` on a folder whose images are crowded in one part: with the fine-tuning
    defaults a share of the crops the training engine sees have all-zero targets."""
    import clipcount.engine.train as engine

    sample = _crowded_left()
    folder = tmp_path / "mine"
    folder.mkdir()
    rows = ["image,class,x,y"]
    for i in range(4):
        Image.fromarray(np.round(sample.image * 255).astype(np.uint8)).save(folder / f"{i}.png")
        rows += [f"{i}.png,dots,{x:.1f},{y:.1f}" for x, y in sample.points]
    (folder / "annotations.csv").write_text("\n".join(rows) + "\n")
    assert len(FolderDataset(folder, split="train")) == 3

    targets: list[float] = []
    real = engine.density_mse_loss

    def recording(pred, target):
        targets.extend(float(t.sum()) for t in target)  # (B, 1, S, S): one sum per crop
        return real(pred, target)

    monkeypatch.setattr(engine, "density_mse_loss", recording)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(folder), "--init", str(tiny_checkpoint),
                 "--out", str(run), "--max-steps", "4", "--batch-size", "3", "--workers", "0", "--no-progress"]) == 0
    used = json.loads((run / "final" / "config.json").read_text())["training"]["train_config"]
    assert used["background_share"] == FINETUNE_DEFAULTS["background_share"] > TrainConfig().background_share == 0
    assert len(targets) == 12 and 0 < targets.count(0.0) < 12  # some crops background, the rest not
