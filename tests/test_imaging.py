"""load_image on the images people really have; atomic saving; expanding inputs into image paths."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcount.errors import ImageError
from clipcount.imaging import ImageLimits, list_images, load_image, save_image_atomic


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def _assert_canonical(array: np.ndarray, height: int, width: int) -> None:
    assert array.shape == (height, width, 3)
    assert array.dtype == np.float32
    assert array.flags.c_contiguous
    assert 0.0 <= array.min() and array.max() <= 1.0


# ---- colour modes ------------------------------------------------------------------------------

def test_rgb_png_and_jpeg(tmp_path):
    img = Image.new("RGB", (48, 40), (255, 128, 0))
    png = load_image(_save(img, tmp_path / "a.png"))
    _assert_canonical(png, 40, 48)
    np.testing.assert_allclose(png[0, 0], [1.0, 128 / 255, 0.0], atol=1e-6)
    jpg = load_image(str(_save(img, tmp_path / "a.jpg", quality=95)))
    _assert_canonical(jpg, 40, 48)
    np.testing.assert_allclose(jpg[20, 20], [1.0, 0.5, 0.0], atol=0.03)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(_save(img, tmp_path / "rot.png", exif=exif))
    _assert_canonical(out, 60, 40)
    np.testing.assert_allclose(out[0, -1], [1, 0, 0])  # marker now at the top-right
    np.testing.assert_allclose(out[0, 0], [0, 0, 1])


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent black
    img.paste((255, 0, 0, 128), (0, 0, 20, 40))  # half-transparent red on the left
    out = load_image(_save(img, tmp_path / "a.png"))
    np.testing.assert_allclose(out[0, 39], [1, 1, 1])
    np.testing.assert_allclose(out[0, 0], [1, 127 / 255, 127 / 255], atol=2 / 255)


def test_la_l_and_one_bit(tmp_path):
    la = Image.new("LA", (40, 40), (0, 0))
    la.paste((0, 255), (0, 0, 10, 40))
    out = load_image(_save(la, tmp_path / "la.png"))
    np.testing.assert_allclose(out[0, 0], [0, 0, 0])
    np.testing.assert_allclose(out[0, 39], [1, 1, 1])
    gray = load_image(_save(Image.new("L", (40, 40), 51), tmp_path / "l.png"))
    np.testing.assert_allclose(gray[5, 5], [0.2, 0.2, 0.2], atol=1e-6)
    bits = load_image(_save(Image.new("1", (40, 40), 1), tmp_path / "b.png"))
    np.testing.assert_allclose(bits[5, 5], [1, 1, 1])


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))  # 0 black, 1 green
    img.paste(1, (0, 0, 20, 40))
    out = load_image(_save(img, tmp_path / "p.png", transparency=0))
    np.testing.assert_allclose(out[0, 0], [0, 1, 0])
    np.testing.assert_allclose(out[0, 39], [1, 1, 1])  # transparent index shows white


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    full = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    out = load_image(_save(Image.fromarray(full), tmp_path / "full.png"))
    assert Image.open(tmp_path / "full.png").mode.startswith("I")
    np.testing.assert_allclose(out[..., 0], full / 65535.0, atol=1e-6)
    # 12-bit data stored in 16 bits: scaled by 4095, so mid-grey stays mid-grey (not clipped white).
    twelve = np.linspace(0, 4095, 40 * 40).reshape(40, 40).astype(np.uint16)
    out12 = load_image(_save(Image.fromarray(twelve), tmp_path / "twelve.png"))
    np.testing.assert_allclose(out12[..., 1], twelve / 4095.0, atol=1e-6)
    assert 0.4 < out12[20, 0, 0] < 0.6


def test_int32_and_float_tiffs(tmp_path):
    values = np.arange(40 * 40, dtype=np.int32).reshape(40, 40)  # max 1599: 12-bit data, scale 4095
    out = load_image(_save(Image.fromarray(values), tmp_path / "i.tif"))
    np.testing.assert_allclose(out[..., 2], values / 4095.0, atol=1e-6)
    unit = np.linspace(0, 1, 40 * 40, dtype=np.float32).reshape(40, 40)
    np.testing.assert_allclose(load_image(_save(Image.fromarray(unit), tmp_path / "f.tif"))[..., 0], unit)
    signed = unit * 10 - 5  # arbitrary scientific floats: stretched to [0, 1]
    np.testing.assert_allclose(load_image(_save(Image.fromarray(signed), tmp_path / "s.tif"))[..., 0],
                               unit, atol=1e-5)


def test_cmyk(tmp_path):
    cyan = Image.new("CMYK", (40, 40), (255, 0, 0, 0))
    np.testing.assert_allclose(load_image(_save(cyan, tmp_path / "c.tif"))[0, 0], [0, 1, 1])
    jpg = load_image(_save(cyan, tmp_path / "c.jpg", quality=95))
    np.testing.assert_allclose(jpg[20, 20], [0, 1, 1], atol=0.03)


# ---- in-memory sources -------------------------------------------------------------------------

def test_numpy_layouts_and_dtypes():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    out = load_image(gray)
    _assert_canonical(out, 40, 50)
    np.testing.assert_allclose(out[..., 1], gray / 255.0, atol=1e-6)
    np.testing.assert_array_equal(load_image(gray[:, :, None]), out)
    rgb = rng.random((40, 50, 3))
    np.testing.assert_allclose(load_image(rgb), rgb, atol=1e-6)
    rgba16 = np.zeros((40, 50, 4), dtype=np.uint16)
    rgba16[..., 0] = 65535
    rgba16[:, :25, 3] = 65535  # left opaque red, right transparent
    out = load_image(rgba16)
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[0, 49], [1, 1, 1])
    rgba8 = np.zeros((40, 50, 4), dtype=np.uint8)
    rgba8[:, :25] = (0, 0, 255, 255)
    np.testing.assert_allclose(load_image(rgba8)[0, 0], [0, 0, 1])
    np.testing.assert_allclose(load_image(rgba8)[0, 49], [1, 1, 1])


def test_numpy_floats_outside_unit_range_refused():
    with pytest.raises(ImageError, match="divide by 255"):
        load_image(np.full((40, 40, 3), 200.0))
    with pytest.raises(ImageError, match="NaN"):
        load_image(np.full((40, 40, 3), np.nan))
    tiny_overshoot = np.full((40, 40, 3), 1.0 + 1e-5, dtype=np.float32)
    assert load_image(tiny_overshoot).max() == 1.0


@pytest.mark.parametrize("shape", [(3, 40, 40), (40, 40, 2), (40,), (2, 40, 40, 3)])
def test_numpy_bad_shapes(shape):
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros(shape, dtype=np.uint8))


def test_bytes_and_pil_sources(tmp_path):
    img = Image.new("RGBA", (40, 40), (10, 20, 30, 255))
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    np.testing.assert_allclose(load_image(buffer.getvalue())[0, 0], np.array([10, 20, 30]) / 255, atol=1e-6)
    out = load_image(img)
    np.testing.assert_allclose(out[0, 0], np.array([10, 20, 30]) / 255, atol=1e-6)
    assert img.mode == "RGBA" and img.size == (40, 40)  # the caller's image is left alone
    with pytest.raises(ImageError, match="list"):
        load_image([1, 2, 3])  # type: ignore[arg-type]


# ---- refusals ----------------------------------------------------------------------------------

def test_tiny_images_refused(tmp_path):
    with pytest.raises(ImageError, match="at least 32"):
        load_image(_save(Image.new("RGB", (31, 200)), tmp_path / "thin.png"))
    with pytest.raises(ImageError, match="at least 32"):
        load_image(np.zeros((200, 10, 3), dtype=np.uint8))
    assert load_image(np.zeros((8, 8)), ImageLimits(min_side=8)).shape == (8, 8, 3)


def test_size_limit_checked_before_decoding(tmp_path):
    path = _save(Image.new("RGB", (100, 100), (1, 2, 3)), tmp_path / "big.png")
    header_only = tmp_path / "header_only.png"
    header_only.write_bytes(path.read_bytes()[:60])  # decoding this would fail as truncated
    with pytest.raises(ImageError, match="more than the limit"):
        load_image(header_only, ImageLimits(max_pixels=5_000))
    with pytest.raises(ImageError, match="truncated"):
        load_image(header_only)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height pixels but holds almost no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def test_decompression_bomb_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(12_000, 12_000))  # 144 M pixels: over this limit, under Pillow's hard one
    with pytest.raises(ImageError, match="12000x12000 = 144,000,000 pixels, more than the limit"):
        load_image(bomb, ImageLimits(max_pixels=100_000_000))
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(40_000, 40_000))  # Pillow itself refuses this at open
    with pytest.raises(ImageError, match="1,600,000,000 pixels.*decompression bomb.*--max-pixels"):
        load_image(huge)
    with pytest.raises(ImageError, match="more than the limit"):
        load_image(np.zeros((100, 100), dtype=np.uint8), ImageLimits(max_pixels=1000))


def test_missing_folder_corrupt_and_non_image(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="notes.jpg is not an image"):
        load_image(text)
    jpg = _save(Image.new("RGB", (200, 200), (9, 9, 9)), tmp_path / "t.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpg.read_bytes()[:400])
    with pytest.raises(ImageError, match="truncated.jpg is corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(ImageError, match="download"):
        load_image("https://example.com/cat.jpg")


def test_error_messages_are_one_line(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "missing.png")
    assert "\n" not in str(info.value)


# ---- downscaling -------------------------------------------------------------------------------

def test_large_images_downscaled_keeping_aspect(tmp_path):
    limits = ImageLimits(max_side_for_counting=128)
    png = load_image(_save(Image.new("RGB", (400, 200), (0, 255, 0)), tmp_path / "w.png"), limits)
    _assert_canonical(png, 64, 128)
    np.testing.assert_allclose(png[30, 60], [0, 1, 0], atol=1e-6)
    # JPEG takes the fast reduced-scale decode path; size is still exact.
    jpg = load_image(_save(Image.new("RGB", (1000, 600), (200, 100, 50)), tmp_path / "w.jpg"), limits)
    _assert_canonical(jpg, 77, 128)
    np.testing.assert_allclose(jpg[40, 60], np.array([200, 100, 50]) / 255, atol=0.03)
    floats = load_image(np.full((300, 100), 0.25, dtype=np.float32), limits)
    _assert_canonical(floats, 128, 43)
    np.testing.assert_allclose(floats, 0.25, atol=1e-5)


def test_panorama_keeps_min_side():
    out = load_image(np.zeros((40, 2000), dtype=np.uint8), ImageLimits(max_side_for_counting=256))
    assert out.shape[0] == 32 and out.shape[1] == 1600


# ---- saving ------------------------------------------------------------------------------------

def test_save_image_atomic_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.random((40, 50, 3)).astype(np.float32)
    target = tmp_path / "out" / "img.png"
    save_image_atomic(image, target)
    np.testing.assert_allclose(load_image(target), image, atol=0.5 / 255 + 1e-6)
    save_image_atomic(Image.new("RGBA", (40, 40), (255, 0, 0, 0)), target.with_suffix(".jpg"))
    np.testing.assert_allclose(load_image(target.with_suffix(".jpg"))[5, 5], [1, 1, 1], atol=0.02)
    save_image_atomic(np.zeros((40, 40), dtype=np.uint8), target)  # replaces the existing file
    assert load_image(target).max() == 0.0
    assert sorted(p.name for p in target.parent.iterdir()) == ["img.jpg", "img.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # usual permissions, not a temp file's 0600


def test_save_image_atomic_failure_leaves_nothing(tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="unknown image file ending"):
        save_image_atomic(np.zeros((40, 40, 3)), tmp_path / "x.unknown")
    with pytest.raises(ImageError, match="shape"):
        save_image_atomic(np.zeros((40, 40, 2)), tmp_path / "x.png")
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")

    def fail_midway(self, handle, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_image_atomic(np.zeros((40, 40, 3)), target)
    assert target.read_bytes() == b"old"  # the old file is intact ...
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]  # ... and no temp file remains


# ---- listing -----------------------------------------------------------------------------------

def test_list_images_folders_globs_files_and_errors(tmp_path):
    for rel in ["b.jpg", "a.PNG", "sub/c.tif", "sub/deeper/d.webp", "notes.txt", ".hidden/e.jpg", "._f.jpg"]:
        path = tmp_path / "photos" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    single = tmp_path / "single.dat"
    single.write_bytes(b"x")
    photos = tmp_path / "photos"
    paths, errors = list_images([
        str(photos), str(single), str(photos / "*.jpg"), str(tmp_path / "nothing-*.png"),
        str(tmp_path / "missing.jpg"), str(tmp_path / "empty"),
    ])
    assert paths == [photos / "a.PNG", photos / "b.jpg", photos / "sub" / "c.tif",
                     photos / "sub" / "deeper" / "d.webp", single]  # b.jpg from the glob not repeated
    assert len(errors) == 3
    assert "nothing-*.png" in errors[0] and "missing.jpg" in errors[1] and "empty" in errors[2]
    recursive, _ = list_images([str(photos / "**" / "*.tif")])
    assert recursive == [photos / "sub" / "c.tif"]
