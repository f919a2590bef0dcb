"""`clipcount count` under torchrun: each rank counts its shard, rank 0 merges the parts in input order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_two_ranks_equal_one_process(tmp_path, tiny_checkpoint, make_image):
    folder = tmp_path / "images"
    for index in range(5):
        make_image(folder / f"img{index}.png", width=96 + 24 * index, seed=index)
    (folder / "broken.jpg").write_text("not an image")
    common = ["count", str(folder), str(tmp_path / "missing.png"), "-p", "dots", "-p", "red discs",
              "--model", str(tiny_checkpoint), "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "clipcount", *common, "--json", str(tmp_path / "one.json")],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert single.returncode == 2, single.stderr  # the broken and missing inputs
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "clipcount"]
    sharded = subprocess.run([*launcher, *common, "--json", str(tmp_path / "two.json")],
                             capture_output=True, text=True, env=_env(), timeout=300)
    assert sharded.returncode != 0  # a rank that met a bad image exits 2, and torchrun reports it
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    assert [(r["image"], r["prompt"]) for r in two] == [(r["image"], r["prompt"]) for r in one]
    for a, b in zip(one, two):
        assert bool(a["error"]) == bool(b["error"])
        if a["count"] is not None:
            assert b["count"] == pytest.approx(a["count"], rel=1e-5)
    assert not list(tmp_path.glob(".two.json.*"))  # no part files or journals left behind


def test_a_sharded_run_needs_an_output_file(tmp_path, tiny_checkpoint, make_image):
    make_image(tmp_path / "a.png")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "clipcount"]
    result = subprocess.run([*launcher, "count", str(tmp_path / "a.png"), "-p", "dots", "--model", str(tiny_checkpoint)],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode != 0
    assert "--json FILE or --csv FILE" in result.stderr
