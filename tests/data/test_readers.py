from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from clipcount.data import (
    CARPK,
    FSC147,
    FSC147S,
    CountingSample,
    FolderDataset,
    ShanghaiTech,
    build_dataset,
    load_image,
    read_image_size,
)
from clipcount.errors import ConfigError, DataError

from .conftest import FSC_IMAGES, make_shanghaitech, write_image, write_shanghaitech_gt


def check_sample(sample: CountingSample) -> None:
    assert sample.image.dtype == np.float32 and sample.image.ndim == 3 and sample.image.shape[2] == 3
    assert 0.0 <= sample.image.min() and sample.image.max() <= 1.0
    assert sample.points.dtype == np.float32 and sample.points.shape[1] == 2
    if len(sample.points):
        assert (sample.points[:, 0] >= 0).all() and (sample.points[:, 0] <= sample.width).all()
        assert (sample.points[:, 1] >= 0).all() and (sample.points[:, 1] <= sample.height).all()


# ---- images -----------------------------------------------------------------------------------

def test_load_image_applies_exif_rotation(tmp_path):
    path = write_image(tmp_path / "rotated.jpg", 30, 50, orientation=6)
    assert read_image_size(path) == (50, 30)
    image = load_image(path)
    assert image.shape == (50, 30, 3) and image.dtype == np.float32


def test_load_image_converts_to_rgb(tmp_path):
    from PIL import Image

    Image.new("L", (7, 5), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (7, 5), (255, 0, 0, 10)).save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "grey.png").shape == (5, 7, 3)
    np.testing.assert_allclose(load_image(tmp_path / "rgba.png")[0, 0], [1, 0, 0])


def test_unreadable_and_missing_images_name_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"this is no jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(tmp_path / "broken.jpg")
    with pytest.raises(DataError, match="absent.jpg"):
        load_image(tmp_path / "absent.jpg")


def test_count_override_only_when_points_are_unknown():
    image = np.zeros((4, 4, 3), np.float32)
    assert CountingSample(image, [], "x", "n", count_override=5).count == 5
    assert CountingSample(image, [[1, 1]], "x", "n", count_override=5).count == 1
    assert CountingSample(image, [], "x", "n").points.shape == (0, 2)


# ---- FSC-147 ----------------------------------------------------------------------------------

def test_fsc147_reads_splits_points_classes_and_boxes(fsc147_root):
    train = FSC147(fsc147_root, "train")
    assert len(train) == 2 and train.names == ["1.jpg", "2.jpg"] and train.classes == ["apples", "apples"]
    assert train.counts == [3, 2] and train.skipped == []
    s = train[0]
    check_sample(s)
    assert s.image.shape == (384, 512, 3) and s.prompt == "apples" and s.name == "1.jpg"
    np.testing.assert_allclose(s.points, FSC_IMAGES["1.jpg"][3])
    np.testing.assert_allclose(s.boxes, [[1, 2, 11, 12], [20, 30, 40, 50], [5, 5, 9, 9]])
    assert train[1].count == 2  # coincident points both count
    assert FSC147(fsc147_root, "val").classes == ["sea shells"]
    assert FSC147(fsc147_root, "test_coco").names == ["3.jpg"]
    assert len(FSC147(fsc147_root, "val_coco")) == 0


def test_fsc147_clips_points_within_one_pixel(fsc147_root):
    s = FSC147(fsc147_root, "test")[0]
    assert s.count == 3
    np.testing.assert_allclose(s.points[2], [0.0, 384.0])
    check_sample(s)


def test_fsc147_rejects_unknown_split_and_missing_files(fsc147_root):
    with pytest.raises(DataError, match="split"):
        FSC147(fsc147_root, "validation")
    (fsc147_root / "ImageClasses_FSC147.txt").unlink()
    with pytest.raises(DataError, match="ImageClasses_FSC147.txt"):
        FSC147(fsc147_root, "train", skip_bad=True)  # dataset-level files are never skippable
    with pytest.raises(DataError, match="not a folder"):
        FSC147(fsc147_root / "nowhere")


def rewrite_annotation(root, name, **changes):
    path = root / "annotation_FSC147_384.json"
    data = json.loads(path.read_text())
    if changes.get("delete"):
        del data[name]
    else:
        data[name].update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "images_384_VarV2" / "2.jpg").unlink(), "2.jpg is listed but not on disk"),
        (lambda root: (root / "images_384_VarV2" / "2.jpg").write_bytes(b"garbage"), "cannot read image"),
        (lambda root: rewrite_annotation(root, "2.jpg", points=[[10, 10], [450, 20]]), "outside the 400x384 image"),
        (lambda root: rewrite_annotation(root, "2.jpg", delete=True), "no entry in"),
    ],
)
def test_fsc147_bad_items_raise_or_skip_with_warning(fsc147_root, damage, message):
    damage(fsc147_root)
    with pytest.raises(DataError, match=message) as info:
        FSC147(fsc147_root, "train")
    assert "2.jpg" in str(info.value) and "skip_bad=True" in str(info.value)
    with pytest.warns(UserWarning, match="2.jpg"):
        ds = FSC147(fsc147_root, "train", skip_bad=True)
    assert ds.names == ["1.jpg"]
    assert [name for name, _ in ds.skipped] == ["2.jpg"] and message.split()[0] in ds.skipped[0][1]


def test_fsc147_missing_class_is_an_error(fsc147_root):
    path = fsc147_root / "ImageClasses_FSC147.txt"
    path.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith("1.jpg")))
    with pytest.raises(DataError, match="1.jpg.*no class"):
        FSC147(fsc147_root, "train")


def test_truncated_image_fails_at_load_naming_the_file(fsc147_root):
    path = fsc147_root / "images_384_VarV2" / "3.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, half the pixels missing
    ds = FSC147(fsc147_root, "val")
    with pytest.raises(DataError, match="3.jpg"):
        ds[0]


# ---- FSC-147-S --------------------------------------------------------------------------------

def test_fsc147_s_counts_without_points(fsc147_root, tmp_path):
    subset = tmp_path / "FSC-147-S-v2.json"
    subset.write_text(json.dumps({"1.jpg": {"class": "people", "count": 1}, "3.jpg": {"class": "lemons", "count": 37}}))
    ds = FSC147S(fsc147_root / "images_384_VarV2", subset)
    assert ds.names == ["1.jpg", "3.jpg"] and ds.classes == ["people", "lemons"] and ds.counts == [1, 37]
    s = ds[1]
    check_sample(s)
    assert s.points.shape == (0, 2) and s.count == 37 and s.count_override == 37
    # The FSC-147 root works too, and the subset file is found next to it.
    shutil.copy(subset, fsc147_root / "FSC-147-S-v2.json")
    assert len(build_dataset("fsc147-s", fsc147_root, None)) == 2


def test_fsc147_s_missing_image_and_bad_count(fsc147_root, tmp_path):
    subset = tmp_path / "s.json"
    subset.write_text(json.dumps({"1.jpg": {"class": "people", "count": 2}, "99.jpg": {"class": "x", "count": 1}}))
    with pytest.raises(DataError, match="99.jpg"):
        FSC147S(fsc147_root, subset)
    with pytest.warns(UserWarning, match="99.jpg"):
        assert FSC147S(fsc147_root, subset, skip_bad=True).names == ["1.jpg"]
    subset.write_text(json.dumps({"1.jpg": {"class": "people", "count": -3}}))
    with pytest.raises(DataError, match="whole number"):
        FSC147S(fsc147_root, subset)


# ---- CARPK ------------------------------------------------------------------------------------

def test_carpk_counts_lines_and_uses_box_centres(carpk_root):
    ds = CARPK(carpk_root)
    assert ds.names == ["20161225_TPZ_00001.png", "20161225_TPZ_00002.png"] and ds.counts == [3, 1]
    s = ds[0]
    check_sample(s)
    assert s.prompt == "car" and s.image.shape == (180, 240, 3)
    np.testing.assert_allclose(s.points, [[20, 15], [110, 60], [110, 60]])


def test_carpk_missing_annotation_and_malformed_line(carpk_root):
    (carpk_root / "Annotations" / "20161225_TPZ_00002.txt").unlink()
    with pytest.raises(DataError, match="20161225_TPZ_00002.txt"):
        CARPK(carpk_root)
    with pytest.warns(UserWarning):
        assert len(CARPK(carpk_root, skip_bad=True)) == 1
    (carpk_root / "Annotations" / "20161225_TPZ_00001.txt").write_text("1 2 3\n")
    with pytest.raises(DataError, match="line 1"):
        CARPK(carpk_root)
    with pytest.raises(DataError, match="train"):
        CARPK(carpk_root, split="train")


# ---- ShanghaiTech -----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["part_A", "part_A_final"])
def test_shanghaitech_layouts(tmp_path, layout):
    make_shanghaitech(tmp_path, layout)
    ds = ShanghaiTech(tmp_path, "A", "test")
    assert ds.names == ["IMG_1.jpg", "IMG_2.jpg", "IMG_10.jpg"]  # natural order
    assert ds.counts == [2, 1, 0] and set(ds.prompts) == {"people"}
    s = ds[0]
    check_sample(s)
    np.testing.assert_allclose(s.points, [[3, 4], [150.5, 110]])
    assert ds[2].points.shape == (0, 2)
    assert len(build_dataset("shanghaitech-a", tmp_path, "test")) == 3
    assert len(ShanghaiTech(tmp_path / layout, "A")) == 3  # the part folder itself


def test_shanghaitech_errors(tmp_path):
    make_shanghaitech(tmp_path, "part_B")
    with pytest.raises(DataError, match="part_A"):
        ShanghaiTech(tmp_path, "A")
    gt = tmp_path / "part_B" / "test_data" / "ground-truth"
    write_shanghaitech_gt(gt / "GT_IMG_1.mat", np.array([[500.0, 3.0]]))
    with pytest.raises(DataError, match="GT_IMG_1.mat"):
        ShanghaiTech(tmp_path, "B")
    (gt / "GT_IMG_1.mat").unlink()
    with pytest.raises(DataError, match="GT_IMG_1.mat.*not found"):
        ShanghaiTech(tmp_path, "B")
    with pytest.warns(UserWarning, match="IMG_1.jpg"):
        ds = ShanghaiTech(tmp_path, "B", skip_bad=True)
    assert ds.names == ["IMG_2.jpg", "IMG_10.jpg"] and ds.skipped[0][0] == "IMG_1.jpg"


# ---- folder -----------------------------------------------------------------------------------

def test_folder_json_one_sample_per_image_and_class(tmp_path):
    write_image(tmp_path / "a.jpg", 40, 60)
    write_image(tmp_path / "sub" / "b.png", 30, 30)
    (tmp_path / "points.json").write_text(json.dumps({
        "a.jpg": [{"class": "apples", "points": [[1, 2], [3, 4]]}, {"class": "pears", "points": []}],
        "sub/b.png": [{"class": "plums", "points": [[5, 5]], "boxes": [[1, 1, 4, 4]]}],
    }))
    ds = FolderDataset(tmp_path, tmp_path / "points.json")
    assert ds.names == ["a.jpg", "a.jpg", "sub/b.png"] and ds.prompts == ["apples", "pears", "plums"]
    assert ds.counts == [2, 0, 1]
    check_sample(ds[2])
    np.testing.assert_allclose(ds[2].boxes, [[1, 1, 4, 4]])


def test_folder_csv_and_default_file(tmp_path):
    write_image(tmp_path / "a.jpg", 40, 60)
    write_image(tmp_path / "b.jpg", 40, 60)
    (tmp_path / "annotations.csv").write_text(
        "image,class,x,y\na.jpg,apples,1,2\na.jpg,apples,3.5,4\na.jpg,kiwis,10,10\nb.jpg,apples,,\n"
    )
    ds = build_dataset("folder", tmp_path, None)
    assert list(zip(ds.names, ds.prompts, ds.counts)) == [("a.jpg", "apples", 2), ("a.jpg", "kiwis", 1), ("b.jpg", "apples", 0)]
    np.testing.assert_allclose(ds[0].points, [[1, 2], [3.5, 4]])


def test_folder_errors(tmp_path):
    write_image(tmp_path / "a.jpg", 40, 60)
    (tmp_path / "bad.csv").write_text("image,label,x,y\na.jpg,apples,1,2\n")
    with pytest.raises(DataError, match="header"):
        FolderDataset(tmp_path, tmp_path / "bad.csv")
    (tmp_path / "bad.csv").write_text("image,class,x,y\na.jpg,apples,one,2\n")
    with pytest.raises(DataError, match="line 2"):
        FolderDataset(tmp_path, tmp_path / "bad.csv")
    (tmp_path / "p.json").write_text(json.dumps({"a.jpg": [{"class": "x", "points": [[100, 2]]}], "b.jpg": [{"class": "x"}]}))
    with pytest.raises(DataError, match="outside"):
        FolderDataset(tmp_path, tmp_path / "p.json")
    with pytest.warns(UserWarning) as record:
        ds = FolderDataset(tmp_path, tmp_path / "p.json", skip_bad=True)
    assert len(ds) == 0 and sorted(n for n, _ in ds.skipped) == ["a.jpg", "b.jpg"] and len(record) == 2
    with pytest.raises(DataError, match="annotations"):
        FolderDataset(tmp_path, tmp_path / "missing.json")
    with pytest.raises(DataError, match="no annotations file"):
        FolderDataset(tmp_path)


def test_build_dataset_names(fsc147_root, carpk_root):
    assert build_dataset("FSC147", fsc147_root, "val").names == ["3.jpg"]
    assert len(build_dataset("carpk", carpk_root, "test")) == 2
    with pytest.raises(ConfigError, match="fsc147"):
        build_dataset("coco", fsc147_root, "test")
