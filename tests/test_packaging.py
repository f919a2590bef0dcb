"""The wheel people install carries the licence the metadata names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_license_file(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    # the package without its bundled weights: the licence, not the assets, is under test
    shutil.copytree(REPO / "clipcount", source / "clipcount",
                    ignore=shutil.ignore_patterns("assets", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("clipcount-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        licences = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]
        assert licences, names
        assert "MIT License" in archive.read(licences[0]).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata
    assert "Copyright (c)" in (REPO / "LICENSE").read_text() and "clipcount developers" in (REPO / "LICENSE").read_text()
