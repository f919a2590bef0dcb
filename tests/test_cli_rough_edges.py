"""Mistakes a person makes on the command line: each gets one line, exit code 2, and nothing
half-written, before any work is done (issue 13)."""

from __future__ import annotations

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
