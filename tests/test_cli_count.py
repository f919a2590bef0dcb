"""`clipcount count`, through its real entry point (subprocess) and in-process for speed."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipcount import models
from clipcount.cli import main
from clipcount.models import NamedModel

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m clipcount ...` in a fresh process, as a person would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": ""}
    return subprocess.run([sys.executable, "-m", "clipcount", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=180)


@pytest.fixture
def photos(tmp_path, make_image) -> Path:
    """A folder with three small pictures, one of them in a subfolder."""
    folder = tmp_path / "photos"
    make_image(folder / "a.png", seed=1)
    make_image(folder / "b.jpg", seed=2)
    make_image(folder / "more" / "c.png", 70, 90, seed=3)
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---- the real entry point -----------------------------------------------------------------------

def test_counts_folder_with_json_and_csv(photos, tiny_checkpoint, tmp_path):
    done = run_cli("count", str(photos), "-p", "dots", "-p", "red discs", "--model", str(tiny_checkpoint),
                   "--json", "out/counts.json", "--csv", "out/counts.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 6  # 3 images x 2 prompts
    image, prompt, count = lines[0].split("\t")
    assert image.endswith("a.png") and prompt == "dots" and float(count) >= 0
    results = json.loads((tmp_path / "out/counts.json").read_text())["results"]
    assert len(results) == 6 and all(row["error"] == "" for row in results)
    assert all(len(row["points"]) == row["objects"] for row in results)
    rows = read_csv(tmp_path / "out/counts.csv")
    assert [r["prompt"] for r in rows[:2]] == ["dots", "red discs"]
    assert float(rows[0]["count"]) == pytest.approx(results[0]["count"])


def test_bad_inputs_are_reported_and_the_rest_counted(photos, tiny_checkpoint, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "notes.txt").write_text("not an image")
    done = run_cli("count", str(photos / "a.png"), "corrupt.png", "notes.txt", "missing.jpg",
                   "-p", "dots", "--model", str(tiny_checkpoint), "--csv", "counts.csv", cwd=tmp_path)
    assert done.returncode == 2
    errors = done.stderr.strip().splitlines()
    for name in ("corrupt.png", "notes.txt", "missing.jpg"):
        assert sum(name in line for line in errors) == 1, done.stderr
    assert all(line.startswith("clipcount: error: ") for line in errors)
    assert "Traceback" not in done.stderr
    rows = {Path(r["image"]).name: r for r in read_csv(tmp_path / "counts.csv")}
    assert rows["a.png"]["error"] == "" and float(rows["a.png"]["count"]) >= 0
    for name in ("corrupt.png", "notes.txt", "missing.jpg"):
        assert name in rows[name]["error"] and rows[name]["count"] == ""


def test_blank_prompt_is_refused_before_anything_is_written(photos, tiny_checkpoint, tmp_path):
    done = run_cli("count", str(photos), "-p", "dots", "-p", "   ", "--model", str(tiny_checkpoint),
                   "--json", "counts.json", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "prompt '   ' is empty" in done.stderr
    assert not (tmp_path / "counts.json").exists()


# ---- in-process ---------------------------------------------------------------------------------

def test_empty_prompt_is_refused(photos, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "counts.csv"
    assert main(["count", str(photos), "-p", "", "--model", str(tiny_checkpoint), "--csv", str(out)]) == 2
    assert "prompt '' is empty" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("command", ["count", "serve"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_json_to_stdout(photos, tiny_checkpoint, capsys):
    assert main(["count", str(photos / "a.png"), "-p", "dots", "--model", str(tiny_checkpoint), "--json", "-"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["prompts"] == ["dots"] and document["results"][0]["image"].endswith("a.png")


def test_csv_to_stdout(photos, tiny_checkpoint, capsys):
    assert main(["count", str(photos / "a.png"), "-p", "dots", "--model", str(tiny_checkpoint), "--csv", "-"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["prompt"] == "dots"


def test_overlays_are_written_per_image_and_prompt(photos, tiny_checkpoint, tmp_path):
    from PIL import Image

    code = main(["count", str(photos), "-p", "dots", "-p", "red discs", "--model", str(tiny_checkpoint),
                 "--overlay", str(tmp_path / "overlays")])
    assert code == 0
    names = sorted(path.name for path in (tmp_path / "overlays").iterdir())
    assert names == ["a.dots.png", "a.red_discs.png", "b.dots.png", "b.red_discs.png",
                     "c.dots.png", "c.red_discs.png"]
    with Image.open(tmp_path / "overlays" / "c.dots.png") as picture:
        assert picture.width == 90 and picture.height > 70  # the image plus a caption bar


def test_resume_counts_only_what_is_missing(photos, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "counts.json"
    assert main(["count", str(photos / "a.png"), "-p", "dots", "--model", str(tiny_checkpoint),
                 "--json", str(out)]) == 0
    first = json.loads(out.read_text())["results"]
    capsys.readouterr()
    assert main(["count", str(photos), "-p", "dots", "--model", str(tiny_checkpoint), "--json", str(out),
                 "--resume"]) == 0
    captured = capsys.readouterr()
    assert "a.png" not in captured.out and captured.out.count("\n") == 2  # b and c only
    assert "1 of 3 images already counted" in captured.err
    results = json.loads(out.read_text())["results"]
    assert sorted(Path(r["image"]).name for r in results) == ["a.png", "b.jpg", "c.png"]
    assert results[0] == first[0]  # the earlier row is carried over as it was


def test_interrupted_run_leaves_no_half_output_and_resumes(photos, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from clipcount.api import Counter

    out = tmp_path / "counts.csv"
    out.write_text("image,prompt,count,objects,width,height,error\n")  # a previous, complete output
    original = Counter.count_many

    def dies_after_one(self, images, prompts):
        stream = original(self, images, prompts)
        yield next(stream)
        raise KeyboardInterrupt

    monkeypatch.setattr(Counter, "count_many", dies_after_one)
    args = ["count", str(photos), "-p", "dots", "--model", str(tiny_checkpoint), "--csv", str(out)]
    assert main(args) == 130
    assert out.read_text() == "image,prompt,count,objects,width,height,error\n"  # untouched
    assert "--resume" in capsys.readouterr().err
    monkeypatch.setattr(Counter, "count_many", original)
    assert main([*args, "--resume"]) == 0
    assert "1 of 3 images already counted" in capsys.readouterr().err
    assert len(read_csv(out)) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # journal cleaned up


def test_resume_retries_images_that_failed(tiny_checkpoint, tmp_path, make_image, capsys):
    image = tmp_path / "late.png"
    image.write_text("not yet an image")
    out = tmp_path / "counts.json"
    args = ["count", str(image), "-p", "dots", "--model", str(tiny_checkpoint), "--json", str(out)]
    assert main(args) == 2
    assert json.loads(out.read_text())["results"][0]["error"]
    make_image(image)
    assert main([*args, "--resume"]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["error"] == "" and row["count"] is not None


@pytest.mark.parametrize("extra, message", [
    (["--resume"], "--resume needs an output file"),
    (["--json", "-", "--csv", "-"], "both write to stdout"),
    (["--stride", "0"], "stride"),
    (["--device", "quantum"], "device"),
])
def test_bad_options_are_one_line_errors(photos, tiny_checkpoint, capsys, extra, message):
    assert main(["count", str(photos), "-p", "dots", "--model", str(tiny_checkpoint), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_missing_model_is_a_clear_error(photos, tmp_path, capsys):
    assert main(["count", str(photos), "-p", "dots", "--model", str(tmp_path / "no-model")]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_model_is_the_default_and_says_what_it_is(photos, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(models.REGISTRY, "demo", NamedModel("demo", tiny_checkpoint, "stand-in", True))
    assert main(["count", str(photos / "a.png"), "-p", "dots"]) == 0
    err = capsys.readouterr().err
    assert err.count("synthetic shapes") == 1 and "--model published" in err


def test_demo_model_not_installed(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(models.REGISTRY, "demo", NamedModel("demo", tmp_path / "absent", "stand-in", True))
    assert main(["count", str(photos), "-p", "dots"]) == 2
    assert "not installed" in capsys.readouterr().err


def test_progress_bar_for_more_than_a_few_images(photos, tiny_checkpoint, monkeypatch, capsys):
    import clipcount.cli.count as count_command

    monkeypatch.setattr(count_command, "FEW_IMAGES", 2)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["count", str(photos), "-p", "dots", "--model", str(tiny_checkpoint)]) == 0
    captured = capsys.readouterr()
    assert "3/3" in captured.err and captured.out.count("\n") == 3
