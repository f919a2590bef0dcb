"""The README's main job: `clipcount demo` counts two prompts in the bundled example with the bundled model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clipcount.models import REGISTRY

pytestmark = pytest.mark.skipif(not (REGISTRY["demo"].folder / "model.safetensors").is_file(),
                                reason="the bundled demo model is not installed")


def test_demo_prints_counts_and_writes_overlays(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clipcount", "demo", "--out", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    assert [line[1] for line in lines] == ["red circles", "green triangles"]
    assert all(float(line[2]) >= 0 for line in lines)
    assert "true count of 'red circles'" in result.stdout
    assert result.stderr.count("synthetic shapes") == 1  # said once
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "example.green_triangles.png", "example.red_circles.png"]
