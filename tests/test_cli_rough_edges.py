"""Mistakes a person makes on the command line: each gets one line, exit code 2, and nothing
half-written, before any work is done (issue 13)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m clipcount ...` in a fresh process, as a person would run it."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "", **(env or {})}
    return subprocess.run([sys.executable, "-m", "clipcount", *args], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=180)


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2, a single 'clipcount: error:' line on stderr that holds `words`; returns the line."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("clipcount: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@pytest.fixture
def picture(tmp_path, make_image) -> Path:
    return make_image(tmp_path / "picture.png", seed=4)


# ---- outputs that cannot be written --------------------------------------------------------------

@pytest.mark.parametrize("flag, target, words", [
    ("--json", "/proc/nope/out.json", ("--json", "/proc")),
    ("--csv", "afile/out.csv", ("--csv", "afile is a file")),
    ("--overlay", "afile", ("--overlay", "afile is a file")),
    ("--json", "afile/deeper/out.json", ("--json", "afile is a file")),
])
def test_unwritable_outputs_are_refused_before_counting(flag, target, words, picture, tiny_checkpoint, tmp_path):
    (tmp_path / "afile").write_text("in the way")
    before = files_under(tmp_path)
    other_output = ["--json", "counts.json"] if flag != "--json" else []  # a good one beside the bad one
    done = run_cli("count", str(picture), "-p", "dots", "--model", str(tiny_checkpoint), *other_output,
                   flag, target, cwd=tmp_path)
    assert_one_line_error(done, *words)
    assert done.stdout == ""  # nothing was counted
    assert files_under(tmp_path) == before  # no output, no hidden journal


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys")
def test_read_only_place_is_refused(picture, tiny_checkpoint, tmp_path):
    done = run_cli("count", str(picture), "-p", "dots", "--model", str(tiny_checkpoint),
                   "--overlay", "/sys/clipcount-overlays", cwd=tmp_path)
    assert_one_line_error(done, "--overlay", "/sys")


def test_demo_out_naming_a_file(tmp_path):
    (tmp_path / "afile").write_text("in the way")
    done = run_cli("demo", "--out", "afile", cwd=tmp_path)
    assert_one_line_error(done, "--out", "afile")
    assert done.stdout == ""
    assert (tmp_path / "afile").read_text() == "in the way"


# ---- a checkpoint whose config cannot build a working model ----------------------------------------

@pytest.mark.parametrize("heads", [3, "four"])
def test_impossible_config_is_refused_at_load_naming_the_setting(heads, picture, tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["clipcount"]["interaction"]["heads"] = heads  # width 16: 3 does not divide it
    (broken / "config.json").write_text(json.dumps(config))
    done = run_cli("count", str(picture), "-p", "dots", "--model", str(broken), "--csv", "counts.csv", cwd=tmp_path)
    assert_one_line_error(done, "interaction.heads", "config.json")
    assert not (tmp_path / "counts.csv").exists() and done.stdout == ""


def test_impossible_config_is_refused_by_the_python_api(tiny_checkpoint, tmp_path):
    from clipcount.api import Counter
    from clipcount.errors import CheckpointError

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["clipcount"]["decoder"]["groups"] = 3  # channels (16, 8, 8, 8)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"decoder\.groups = 3"):
        Counter.from_pretrained(broken, device="cpu")


# ---- a --model that looks like a path ------------------------------------------------------------

@pytest.mark.parametrize("source, is_path", [
    ("weights/clip-count-published", False),  # owner/name: could be a hub id ...
    ("./weights/clip-count-published", True), ("/abs/model", True), ("~/models/x", True),
    ("runs/fsc147/final", True), ("weights\\model", True), ("model.safetensors", True),
    ("user/model.ckpt", True), ("user/model-v1.5", False), ("weights/", True),
])
def test_model_arguments_that_look_like_paths(source, is_path, tmp_path, monkeypatch):
    from clipcount.modeling.checkpoint import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert looks_like_path(source) is is_path
    (tmp_path / "weights").mkdir()  # ... unless its first part exists here
    assert looks_like_path("weights/clip-count-published")


def test_missing_model_folder_is_said_at_once_without_the_hub(picture, tmp_path):
    (tmp_path / "weights").mkdir()  # the README's folder, before converting into it
    done = run_cli("count", str(picture), "-p", "dots", "--model", "weights/clip-count-published",
                   cwd=tmp_path, env={"HF_HUB_OFFLINE": ""})
    assert_one_line_error(done, "checkpoint folder weights/clip-count-published not found")


def test_unreachable_hub_is_said_at_once(monkeypatch):
    import socket

    import huggingface_hub

    from clipcount.errors import CheckpointError
    from clipcount.modeling import checkpoint

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def must_not_download(*args, **kwargs):
        raise AssertionError("downloaded (with a minute of retries) although the hub cannot be reached")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError, match="no local folder.*cannot be reached"):
        checkpoint.resolve_checkpoint("someone/some-model")


# ---- big photos ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_photo(tmp_path_factory) -> Path:
    """A 12000x9000 JPEG (108 MP, as phone cameras write them): flat grey with a few bright squares."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (12_000, 9_000), (60, 60, 60))
    draw = ImageDraw.Draw(picture)
    for x, y in ((2000, 1500), (6000, 4500), (10000, 7000)):
        draw.rectangle((x, y, x + 400, y + 400), fill=(250, 250, 250))
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    picture.save(path, quality=70)
    return path


def test_big_photo_counted_and_reported_in_its_own_pixels(big_photo, tiny_counter):
    result = tiny_counter.count(big_photo, "squares")
    assert result.image_size == (9_000, 12_000)  # the file's grid, not the 4096-px one it was counted at
    assert result.downscaled and result.density.shape == (3_072, 4_096)
    if len(result.points):
        assert result.points[:, 0].max() < 12_000 and result.points[:, 1].max() < 9_000
        assert result.points[:, 0].max() > 4_096 or result.points[:, 1].max() > 3_072 or len(result.points) < 3
        on_density = result.points_on_density()
        assert on_density[:, 0].max() < 4_096 and on_density[:, 1].max() < 3_072


def test_big_photo_from_the_command_line(big_photo, tiny_checkpoint, tmp_path, capsys):
    from clipcount.cli import main

    out = tmp_path / "counts.json"
    assert main(["count", str(big_photo), "-p", "squares", "--model", str(tiny_checkpoint), "--json", str(out),
                 "--overlay", str(tmp_path / "overlays")]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert (row["width"], row["height"]) == (12_000, 9_000)
    assert all(0 <= x < 12_000 and 0 <= y < 9_000 for x, y in row["points"])
    err = capsys.readouterr().err
    assert err.count("counted at 4096x3072") == 1 and "12000x9000" in err
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 1


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height pixels but holds almost no image data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_with_its_size_and_max_pixels_decides(tiny_checkpoint, tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(14_000, 14_000))  # 196 MP: past Pillow's own guard too
    done = run_cli("count", "bomb.png", "-p", "dots", "--model", str(tiny_checkpoint), cwd=tmp_path)
    assert_one_line_error(done, "bomb.png", "196,000,000 pixels", "--max-pixels")
    done = run_cli("count", "bomb.png", "-p", "dots", "--model", str(tiny_checkpoint), "--max-pixels", "300M",
                   cwd=tmp_path)
    assert_one_line_error(done, "bomb.png", "truncated")  # let through to decoding, which finds it empty
    done = run_cli("count", "bomb.png", "-p", "dots", "--model", str(tiny_checkpoint), "--max-pixels", "lots",
                   cwd=tmp_path)
    assert_one_line_error(done, "--max-pixels", "lots")


def test_eval_max_pixels(tiny_checkpoint, tmp_path, make_image, capsys):
    from clipcount.cli import main

    make_image(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "annotations.csv").write_text("image,class,x,y\na.png,dots,10,10\n")
    code = main(["eval", "--model", str(tiny_checkpoint), "--dataset", "folder", "--root", str(tmp_path / "data"),
                 "--split", "all", "--no-progress", "--max-pixels", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and "more than the limit of 1,000" in err and len(err.strip().splitlines()) == 1


# ---- --resume and saved progress -------------------------------------------------------------------

def test_resume_drops_a_csv_row_cut_short(tiny_checkpoint, tmp_path, make_image, capsys):
    from clipcount.cli import main

    for name in ("a.png", "b.png"):
        make_image(tmp_path / name)
    out = tmp_path / "counts.csv"
    out.write_text("image,prompt,count,objects,width,height,error\n"
                   f"{tmp_path / 'a.png'},dots,1.5,2,128,96,\n{tmp_path / 'b.png'},do")  # the last line cut
    assert main(["count", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-p", "dots", "--model",
                 str(tiny_checkpoint), "--csv", str(out), "--resume"]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(Path(r["image"]).name, r["prompt"]) for r in rows] == [("a.png", "dots"), ("b.png", "dots")]
    assert all(r["count"] != "" and r["error"] == "" for r in rows)
    assert "1 of 2 images already counted" in capsys.readouterr().err


def test_saved_progress_is_not_discarded_silently(tiny_checkpoint, tmp_path, make_image, capsys):
    from clipcount.cli import main

    make_image(tmp_path / "a.png")
    journal = tmp_path / ".counts.csv.clipcount-partial.jsonl"
    saved = {"image": str(tmp_path / "a.png"), "prompt": "dots", "count": 1.0, "objects": 1, "width": 128,
             "height": 96, "error": "", "points": [[1.0, 2.0]]}
    journal.write_text(json.dumps(saved) + "\n")
    args = ["count", str(tmp_path / "a.png"), "-p", "dots", "--model", str(tiny_checkpoint),
            "--csv", str(tmp_path / "counts.csv")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "1 counted image" in err and len(err.splitlines()) == 1
    assert journal.read_text() == json.dumps(saved) + "\n" and not (tmp_path / "counts.csv").exists()
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert main([*args, "--overwrite"]) == 0
    assert not journal.exists() and (tmp_path / "counts.csv").is_file()


# ---- messages ----------------------------------------------------------------------------------------

def test_demo_note_is_one_short_line_after_the_results(picture, tmp_path):
    done = run_cli("count", str(picture), "missing.jpg", "-p", "dots", cwd=tmp_path)  # the demo model
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("clipcount: error: missing.jpg")  # the real problem comes first
    notes = [line for line in lines if "demo model" in line]
    assert len(notes) == 1 and notes[0] == lines[-1] and len(notes[0]) <= 130
    assert "Warning" not in done.stderr
    quiet = run_cli("count", str(picture), "-p", "dots", "--quiet", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout.count("\t") == 2


def test_eval_demo_note_and_no_foreign_published_scores(tmp_path, make_image):
    make_image(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "annotations.csv").write_text("image,class,x,y\na.png,dots,10,10\na.png,dots,20,20\n")
    done = run_cli("eval", "--model", "demo", "--dataset", "folder", "--root", "data", "--split", "all", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "published" not in done.stdout and "MAE" in done.stdout
    assert "Warning" not in done.stderr and "warn" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "demo model" in lines[0] and len(lines[0]) <= 130
    quiet = run_cli("eval", "--model", "demo", "--dataset", "folder", "--root", "data", "--split", "all", "--no-progress", "-q",
                    cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_empty_file_is_said_to_be_empty(tiny_checkpoint, tmp_path, capsys):
    from clipcount.cli import main
    from clipcount.errors import ImageError
    from clipcount.imaging import load_image

    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    assert main(["count", str(tmp_path / "empty.jpg"), "-p", "dots", "--model", str(tiny_checkpoint)]) == 2
    assert "empty.jpg is empty (0 bytes)" in capsys.readouterr().err


def test_long_prompt_is_said_to_be_cut(picture, tiny_checkpoint, tiny_counter, capsys):
    from clipcount.api import PromptCutWarning
    from clipcount.cli import main

    long_prompt = " ".join(["red"] * 400)  # ~1600 characters, far past 77 tokens
    with pytest.warns(PromptCutWarning, match="longer than CLIP reads"):
        tiny_counter.count(picture, long_prompt)
    assert tiny_counter.cut_prompts(["dots", long_prompt]).keys() == {long_prompt}
    assert main(["count", str(picture), "-p", long_prompt, "-p", "dots", "--model", str(tiny_checkpoint)]) == 0
    err = capsys.readouterr().err
    assert err.count("longer than CLIP reads") == 1 and len(err.strip().splitlines()) == 1


def test_train_on_an_empty_split_gives_only_the_error(tmp_path, make_image, capsys):
    import warnings

    from clipcount.cli import main

    make_image(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "annotations.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy "Mean of empty slice" would now raise
        code = main(["train", "--tiny", "--dataset", "folder", "--root", str(tmp_path / "data"),
                     "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2 and "empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_usage_errors_are_one_line(tmp_path):
    done = run_cli("count", "x.jpg", cwd=tmp_path)  # no --prompt
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "-p/--prompt" in done.stderr and "--help" in done.stderr


# ---- serve --------------------------------------------------------------------------------------------

def test_serve_checks_max_file_size_before_loading_the_model(tmp_path):
    # the model named does not exist: had it been loaded first, that would be the error
    done = run_cli("serve", "--max-file-size", "lots", "--model", "./no/such/model", cwd=tmp_path)
    assert_one_line_error(done, "--max-file-size", "lots")


def test_serve_prints_its_address_not_gradio_share_advice(tiny_checkpoint, monkeypatch, capsys):
    from types import SimpleNamespace

    from clipcount.cli import main, serve

    launched = {}

    def fake_serve(counter, **options):
        launched.update(options)
        print("* To create a public link, set `share=True` in `launch()`." if not options.get("quiet") else "")
        app = SimpleNamespace(block_thread=lambda: None)
        return SimpleNamespace(url="http://127.0.0.1:7860/", app=app, page=SimpleNamespace(close=lambda: None))

    monkeypatch.setattr(serve, "_import_web", lambda: SimpleNamespace(serve=fake_serve))
    assert main(["serve", "--model", str(tiny_checkpoint), "--max-file-size", "20 MB"]) == 0
    captured = capsys.readouterr()
    assert "share" not in captured.out + captured.err
    assert "http://127.0.0.1:7860/" in captured.err
    assert launched["quiet"] is True and launched["max_file_size"] == "20mb"


@pytest.mark.parametrize("argv, words", [
    (["eval", "--dataset", "folder", "--root", "data", "--batch", "0"], ("--batch",)),
    (["eval", "--dataset", "folder", "--root", "data", "--stride", "-3"], ("--stride",)),
    (["train", "--tiny", "--dataset", "folder", "--root", "data", "--out", "afile"], ("--out", "afile")),
])
def test_more_bad_options_are_one_line_errors(argv, words, tiny_checkpoint, tmp_path, make_image, capsys, monkeypatch):
    from clipcount.cli import main

    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "annotations.csv").write_text("image,class,x,y\na.png,dots,10,10\n")
    (tmp_path / "afile").write_text("in the way")
    model = [] if argv[0] == "train" else ["--model", str(tiny_checkpoint)]
    assert main([*argv, *model, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(word in err for word in words), err


@pytest.mark.parametrize("content", [b"", b"some notes\nmore\n", b"\xff\xd8\xff\xe0 not really a jpeg"])
def test_convert_official_on_a_non_checkpoint(content, tmp_path, capsys):
    from clipcount.cli import main

    (tmp_path / "thing.ckpt").write_bytes(content)
    assert main(["convert-official", str(tmp_path / "thing.ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "thing.ckpt is not a CLIP-Count checkpoint" in err
    assert "weights_only" not in err and "pop from empty list" not in err and "PyTorch 2.6" not in err
    assert ("empty" in err) == (content == b"")
    assert not (tmp_path / "out").exists()


def test_warnings_are_one_plain_line(tiny_checkpoint, tmp_path, make_image):
    make_image(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "data" / "annotations.csv").write_text("image,class,x,y\na.png,dots,10,10\nbroken.png,dots,5,5\n")
    done = run_cli("eval", "--model", str(tiny_checkpoint), "--dataset", "folder", "--root", "data", "--split", "all",
                   "--skip-bad", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and all(line.startswith("clipcount: warning: ") for line in lines), done.stderr
    assert any("broken.png" in line for line in lines) and ".py:" not in done.stderr
