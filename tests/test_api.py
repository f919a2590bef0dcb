"""The Python API (Counter, CountResult), the named-model registry and the overlay picture."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcount import models
from clipcount.api import Counter, CountResult, check_prompt_list
from clipcount.errors import CheckpointError, ConfigError, ImageError, PromptError
from clipcount.models import DemoModelWarning, NamedModel, resolve_model
from clipcount.visualize import POINT_FILL, colormap, overlay

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_is(monkeypatch):
    """demo_is(folder): make the registry's "demo" point at `folder` for one test."""

    def point(folder: Path) -> None:
        entry = NamedModel("demo", Path(folder), "test stand-in", synthetic_only=True)
        monkeypatch.setitem(models.REGISTRY, "demo", entry)

    return point


# ---- loading ------------------------------------------------------------------------------------

def test_from_pretrained_accepts_folder_and_weights_file(tiny_checkpoint, blob_image):
    by_folder = Counter.from_pretrained(tiny_checkpoint, device="cpu")
    by_file = Counter.from_pretrained(tiny_checkpoint / "model.safetensors", device="cpu")
    image = blob_image()
    assert by_folder.count(image, "dots").count == pytest.approx(by_file.count(image, "dots").count, rel=1e-6)
    assert by_folder.synthetic_only is False


def test_demo_model_missing_says_how_to_get_weights(demo_is, tmp_path):
    demo_is(tmp_path / "not-installed")
    with pytest.raises(CheckpointError, match="not installed.*convert-official"):
        Counter.from_pretrained("demo")


def test_demo_model_warns_with_its_own_category(demo_is, tiny_checkpoint):
    demo_is(tiny_checkpoint)
    with pytest.warns(DemoModelWarning, match="synthetic shapes.*convert-official"):
        counter = Counter.from_pretrained("demo", device="cpu")
    assert counter.synthetic_only


def test_demo_warning_is_shown_once_per_process(tiny_checkpoint):
    script = (
        "from pathlib import Path\n"
        "from clipcount import models\n"
        "from clipcount.api import Counter\n"
        f"models.REGISTRY['demo'] = models.NamedModel('demo', Path({str(tiny_checkpoint)!r}), '', True)\n"
        "Counter.from_pretrained('demo', device='cpu')\n"
        "Counter.from_pretrained('demo', device='cpu')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("DemoModelWarning") == 1
    assert "synthetic shapes" in done.stderr


def test_published_ckpt_file_is_refused_with_conversion_hint(tmp_path):
    ckpt = tmp_path / "clipcount_pretrained.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="convert-official"):
        resolve_model(ckpt)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Counter.from_pretrained(tmp_path / "nothing-here")


# ---- counting -----------------------------------------------------------------------------------

def test_one_prompt_gives_one_result_at_the_image_resolution(tiny_counter, blob_image):
    image = blob_image(96, 128)
    result = tiny_counter.count(image, "bright dots")
    assert isinstance(result, CountResult)
    assert result.prompt == "bright dots"
    assert result.image_size == (96, 128)
    assert result.density.shape == (96, 128) and result.density.dtype == np.float32
    # The density keeps its mass when brought to the image's size: it still sums to the count.
    assert result.density.sum() / tiny_counter.density_scale == pytest.approx(result.count, rel=1e-4)


def test_points_are_count_consistent_and_inside_the_image(tiny_counter, blob_image):
    result = tiny_counter.count(blob_image(80, 200), "dots")
    assert result.points.shape == (int(np.floor(result.count + 0.5)), 2)
    xs, ys = result.points[:, 0], result.points[:, 1]
    assert np.all((xs >= -0.5) & (xs <= 199.5)) and np.all((ys >= -0.5) & (ys <= 79.5))


def test_count_matches_the_predictor(tiny_counter, blob_image):
    image = blob_image(96, 128)
    tensor = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
    density = tiny_counter.predictor.predict(tensor, ["dots"])[0]
    assert tiny_counter.count(image, "dots").count == pytest.approx(tiny_counter.predictor.count(density), rel=1e-6)


def test_many_prompts_encode_the_image_once(tiny_counter, monkeypatch, blob_image):
    calls = []
    original = tiny_counter.predictor.encode_windows
    monkeypatch.setattr(tiny_counter.predictor, "encode_windows", lambda w: calls.append(w.shape) or original(w))
    results = tiny_counter.count(blob_image(), ["dots", "discs", "circles"])
    assert [r.prompt for r in results] == ["dots", "discs", "circles"]
    assert len(calls) == 1
    alone = tiny_counter.count(blob_image(), "discs")
    assert results[1].count == pytest.approx(alone.count, rel=1e-5)


def test_every_kind_of_image_source_gives_the_same_count(tiny_counter, tmp_path, blob_image):
    pixels = blob_image(70, 90)
    path = tmp_path / "dots.png"
    Image.fromarray(pixels).save(path)
    expected = tiny_counter.count(pixels, "dots").count
    for source in (path, str(path), path.read_bytes(), Image.open(path), pixels.astype(np.float32) / 255.0):
        assert tiny_counter.count(source, "dots").count == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("prompts", ["", "   ", ["dots", " \n"], []])
def test_empty_prompts_are_refused_by_name(tiny_counter, prompts, blob_image):
    with pytest.raises(PromptError, match="empty|no prompt"):
        tiny_counter.count(blob_image(), prompts)


def test_prompts_are_tidied():
    assert check_prompt_list("  red\n cars ") == ["red cars"]
    with pytest.raises(PromptError, match="not text"):
        check_prompt_list(["dots", 3])


def test_unreadable_image_is_an_image_error_naming_it(tiny_counter, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_text("this is not a picture")
    with pytest.raises(ImageError, match="holiday.jpg"):
        tiny_counter.count(bad, "dots")


def test_count_many_is_lazy_and_keeps_going_after_a_bad_image(tiny_counter, tmp_path, blob_image):
    good = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        Image.fromarray(blob_image(seed=i)).save(path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    consumed = []

    def sources():
        for path in [good[0], bad, good[1], good[2]]:
            consumed.append(path)
            yield path

    stream = tiny_counter.count_many(sources(), ["dots", "discs"])
    first = next(stream)
    assert len(consumed) <= 2  # the next image at most is being decoded ahead
    rest = list(stream)
    assert [item.error is None for item in [first, *rest]] == [True, False, True, True]
    assert "bad.png" in rest[0].error and rest[0].results == []
    assert first.results[0].count == pytest.approx(tiny_counter.count(good[0], "dots").count, rel=1e-5)
    assert [row["prompt"] for row in rest[0].to_rows(["dots", "discs"])] == ["dots", "discs"]
    assert rest[0].to_rows(["dots", "discs"])[0]["error"] == rest[0].error


def test_count_many_checks_prompts_before_reading_images(tiny_counter):
    with pytest.raises(PromptError):
        next(tiny_counter.count_many(["never-read.png"], [" "]))


# ---- device, precision, stride ------------------------------------------------------------------

def test_device_and_precision_defaults(tiny_checkpoint):
    """auto: the GPU if any; bf16 there and on a CPU with native bf16 (its density part), else fp32."""
    from clipcount.engine.inference import cpu_has_native_bf16

    counter = Counter.from_pretrained(tiny_checkpoint)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert counter.device.type == expected
    assert counter.precision == ("bf16" if expected == "cuda" or cpu_has_native_bf16() else "fp32")


def test_precision_can_be_forced(tiny_checkpoint, blob_image):
    counter = Counter.from_pretrained(tiny_checkpoint, device="cpu", precision="bf16")
    assert counter.precision == "bf16"
    assert np.isfinite(counter.count(blob_image(), "dots").count)


@pytest.mark.parametrize("options, message", [
    ({"precision": "fp8"}, "unknown precision"),
    ({"device": "tpu"}, "device"),
    ({"stride": 0}, "stride"),
    ({"stride": 65}, "stride"),
])
def test_bad_options_are_config_errors(tiny_checkpoint, options, message):
    with pytest.raises(ConfigError, match=message):
        Counter.from_pretrained(tiny_checkpoint, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        Counter.from_pretrained(tiny_checkpoint, device="cuda")


# ---- the overlay picture ------------------------------------------------------------------------

def test_colormap_brightens_monotonically():
    colours = colormap(np.linspace(0, 1, 50)[None])[0]  # (50, 3)
    brightness = colours @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(brightness) > 0)


def test_overlay_draws_heat_points_and_caption():
    image = np.zeros((60, 80, 3), dtype=np.float32)
    density = np.zeros((60, 80), dtype=np.float32)
    density[30, 40] = 60.0
    picture = overlay(image, density, np.array([[10.0, 10.0]]), 1.0, "dots")
    assert picture.mode == "RGB" and picture.width == 80 and picture.height > 60
    pixels = np.asarray(picture)
    bar = picture.height - 60
    assert tuple(pixels[bar + 10, 10]) == POINT_FILL  # the point: a cyan disc
    assert pixels[bar + 30, 40].sum() > pixels[bar + 50, 70].sum()  # heat where the mass is
    assert pixels[:bar].max() > 200  # caption text


def test_overlay_of_a_real_count_saves(tiny_counter, tmp_path, blob_image):
    image = blob_image()
    result = tiny_counter.count(image, "a rather long prompt about bright round dots on a dark field")
    picture = overlay(image.astype(np.float32) / 255, result.density, result.points, result.count, result.prompt)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    assert buffer.tell() > 0


def test_windowing_follows_the_model_and_can_be_chosen(tiny_checkpoint, blob_image):
    from clipcount.errors import ConfigError
    from clipcount.modeling.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    assert Counter(model, device="cpu").predictor.windowing == "clipcount"  # new models: clipcount's own
    model.config.windowing = "published"  # what a converted published checkpoint says
    assert Counter(model, device="cpu", stride=16).predictor.windowing == "published"
    chosen = Counter(model, device="cpu", windowing="clipcount", stride=16)
    assert chosen.predictor.windowing == "clipcount"
    assert chosen.count(blob_image(width=200), "dots").count >= 0
    published = Counter(model, device="cpu", stride=16)  # 64-pixel windows: 16 divides them
    assert published.count(blob_image(width=200), "dots").density.shape == (96, 200)
    with pytest.raises(ConfigError, match="divides the window"):
        Counter(model, device="cpu", stride=20)
    with pytest.raises(ConfigError, match="unknown windowing"):
        Counter(model, device="cpu", windowing="fancy")


def test_a_model_taller_than_its_window_counts_at_the_image_resolution(tiny_checkpoint, blob_image):
    from clipcount.modeling.checkpoint import load_model

    model = load_model(tiny_checkpoint)
    model.config.image_height = 96  # 64-pixel windows over images resized to 96 pixels
    counter = Counter(model, device="cpu", precision="fp32")
    result = counter.count(blob_image(80, 200), "dots")
    assert result.density.shape == (80, 200)
    tensor = torch.from_numpy(blob_image(80, 200).astype(np.float32) / 255.0).permute(2, 0, 1)
    density = counter.predictor.predict(tensor, ["dots"])[0]
    assert density.shape == (96, 240)
    assert result.count == pytest.approx(counter.predictor.count(density), rel=1e-5)
    with pytest.raises(ConfigError, match="one row"):
        Counter(model, device="cpu", windowing="published", stride=16)
