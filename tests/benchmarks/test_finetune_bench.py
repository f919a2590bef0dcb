"""benchmarks/finetune.py: its one undeclared dependency is declared, and missing it is one line.

(The benchmark itself takes ~10 CPU minutes and is not run here; tests/engine/test_background.py
tests the training mechanism it measures.)"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from benchmarks import finetune

REPO = Path(__file__).resolve().parents[2]


def test_scikit_image_is_the_bench_extra_only():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(requirement.startswith("scikit-image") for requirement in extras["bench"])
    assert not any(requirement.startswith("scikit-image") for requirement in extras["test"])
    assert "pip install -e '.[bench]'" in (REPO / "README.md").read_text()


def test_without_scikit_image_it_stops_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # as if not installed
    out = tmp_path / "finetune.json"
    assert finetune.main(["--out", str(out), "--work", str(tmp_path / "work")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "scikit-image" in lines[0] and "pip install -e '.[bench]'" in lines[0]
    assert not out.exists() and not (tmp_path / "work").exists()  # stopped before any work
