from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipcount.data import FSC147, FSC147S, AugmentConfig, CountingSample, TrainingDataset, collate
from clipcount.errors import DataError


def test_items_have_the_training_shapes_and_consistent_counts(fsc147_root):
    ds = TrainingDataset(FSC147(fsc147_root, "train"), crop_size=64, augment_cfg=AugmentConfig(augment_prob=1.0))
    assert len(ds) == 2
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["density"].shape == (1, 64, 64) and item["density"].dtype == torch.float32
        assert isinstance(item["count"], float) and item["prompt"] == "apples"
        assert float(item["density"].sum()) / 60.0 == pytest.approx(item["count"], rel=1e-3, abs=1e-3)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0


def test_resize_to_crop_height_keeps_all_points_of_a_wide_image():
    image = np.random.default_rng(0).random((100, 50, 3), dtype=np.float32)
    base = [CountingSample(image, [[10, 10], [40, 90], [25, 50]], "x", "tall.jpg")]
    ds = TrainingDataset(base, crop_size=32, augment=False)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32)  # 100x50 -> 32x16, padded to 32x32
    assert item["count"] == 3.0
    assert float(item["image"][:, :, 16:].abs().sum()) == 0.0


def test_image_height_resizes_before_the_crop_so_objects_keep_more_pixels():
    image = np.zeros((100, 100, 3), dtype=np.float32)
    image[40:60, 40:60] = 1.0  # one 20-pixel square, its point in the middle
    base = [CountingSample(image, [[50, 50]], "x", "square.jpg")]
    ds = TrainingDataset(base, crop_size=40, augment=False, image_height=80)  # 100 -> 80, then 40x40
    widths = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["image"].shape == (3, 40, 40)
        widths.append(float((item["image"][0] > 0.5).any(dim=0).sum()))
    assert max(widths) == pytest.approx(16, abs=1)  # a whole square, 20 pixels at 80/100
    with pytest.raises(Exception, match="at least the crop size"):
        TrainingDataset(base, crop_size=40, image_height=30)


def test_stream_is_deterministic_per_seed_epoch_and_index(fsc147_root):
    base = FSC147(fsc147_root, "train")
    cfg = AugmentConfig(augment_prob=0.5, mosaic_prob=0.5)
    a, b = TrainingDataset(base, 64, cfg, seed=3), TrainingDataset(base, 64, cfg, seed=3)
    for i in range(2):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["density"], b[i]["density"])
    images = {a[0]["image"].numpy().tobytes()}
    for epoch in range(1, 4):
        a.set_epoch(epoch)
        images.add(a[0]["image"].numpy().tobytes())
    assert len(images) > 1  # new epochs, new crops
    other_seed = TrainingDataset(base, 64, cfg, seed=4)
    assert not all(torch.equal(a[i]["image"], other_seed[i]["image"]) for i in range(2))


def test_collate_stacks_tensors_and_lists_strings(fsc147_root):
    ds = TrainingDataset(FSC147(fsc147_root, "train"), crop_size=32)
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["density"].shape == (2, 1, 32, 32)
    assert batch["count"].shape == (2,) and batch["count"].dtype == torch.float32
    assert batch["prompt"] == ["apples", "apples"] and batch["name"] == ["1.jpg", "2.jpg"]


def test_works_in_a_dataloader_with_workers(fsc147_root):
    ds = TrainingDataset(FSC147(fsc147_root, "train"), crop_size=32, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    (batch,) = list(loader)
    direct = collate([ds[0], ds[1]])
    assert torch.equal(batch["image"], direct["image"])


def test_count_only_datasets_are_refused_for_training(fsc147_root, tmp_path):
    subset = tmp_path / "s.json"
    subset.write_text(json.dumps({"1.jpg": {"class": "people", "count": 2}}))
    ds = TrainingDataset(FSC147S(fsc147_root, subset), crop_size=32)
    with pytest.raises(DataError, match="no point annotations"):
        ds[0]
