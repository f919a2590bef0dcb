"""`--model published`: downloaded from a local HTTP server (the rule-built released checkpoint) with
CLIP from a local folder, converted, cached; a killed or truncated download is never trusted; offline
first use says what to do in one line."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from clipcount.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]


class _Handler(http.server.BaseHTTPRequestHandler):
    """/released.ckpt: the file; /slow/...: the same, trickled; /truncated.ckpt: its first half only."""

    payload = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = self.payload[: len(self.payload) // 2] if self.path == "/truncated.ckpt" else self.payload
        if self.path not in ("/released.ckpt", "/slow/released.ckpt", "/truncated.ckpt"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        step = 1 << 16
        for start in range(0, len(body), step):
            try:
                self.wfile.write(body[start : start + step])
            except (BrokenPipeError, ConnectionResetError):
                return
            if self.path.startswith("/slow/"):
                time.sleep(0.05)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(rule_files):
    handler = type("Handler", (_Handler,), {"payload": rule_files.released.read_bytes()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/released.ckpt"  # nothing listens there any more


@pytest.fixture
def environment(monkeypatch, tmp_path, rule_files, server):
    monkeypatch.setenv("CLIPCOUNT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLIPCOUNT_PUBLISHED_URL", f"{server}/released.ckpt")
    monkeypatch.setenv("CLIPCOUNT_PUBLISHED_CLIP", str(rule_files.clip_folder))
    return tmp_path / "cache" / "models"


def test_killed_download_then_first_use_then_offline(environment, server, rule_files, monkeypatch, capfd):
    from clipcount import published
    from clipcount.api import Counter

    # 1. a download killed half-way leaves nothing that a later run trusts
    env = {**os.environ, "PYTHONPATH": str(REPO), "CLIPCOUNT_PUBLISHED_URL": f"{server}/slow/released.ckpt"}
    child = subprocess.Popen([sys.executable, "-c", "from clipcount.published import ensure_published; "
                              "ensure_published()"], env=env, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not _partial_bytes(environment) > 1 << 20:
            time.sleep(0.2)
        assert _partial_bytes(environment) > 1 << 20, "the download never started"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not published.is_cached()
    assert not (environment / "clip-count-published.ckpt").exists()
    assert list(environment.glob(".published.tmp-*"))  # the staging folder of the killed run is left ...

    # 2. first use: downloads (with a progress bar), converts, caches; the stale staging goes
    counter = Counter.from_pretrained("published", device="cpu")
    err = capfd.readouterr().err
    assert "downloading the published CLIP-Count checkpoint" in err and "converting" in err
    assert published.is_cached() and not list(environment.glob(".published.tmp-*"))  # ... and is removed
    assert not (environment / "clip-count-published.ckpt").exists()
    assert counter.predictor.windowing == "published"
    model = counter.predictor.model
    assert model.config.compat and model.config.interaction.heads == 4
    released = rule_files.released_state
    assert torch.equal(model.interaction.fim_blocks[1].attn.wq.weight, released["model.fim_blocks.1.attn.wq.weight"])
    clip = torch.load(rule_files.clip_file, weights_only=True, mmap=True)
    assert torch.equal(model.clip.visual.conv1.weight, clip["visual.conv1.weight"])

    # 3. later uses need no network and no CLIP source
    monkeypatch.setenv("CLIPCOUNT_PUBLISHED_URL", _closed_port_url())
    monkeypatch.setenv("CLIPCOUNT_PUBLISHED_CLIP", str(environment / "nowhere"))
    again = Counter.from_pretrained("published", device="cpu")
    assert again.predictor.model.config.windowing == "published"


def _partial_bytes(models: Path) -> int:
    return sum(f.stat().st_size for f in models.glob(".published.tmp-*/*") if f.is_file())


def test_truncated_download_is_not_trusted(environment, server, monkeypatch):
    from clipcount import published

    monkeypatch.setenv("CLIPCOUNT_PUBLISHED_URL", f"{server}/truncated.ckpt")
    with pytest.raises(CheckpointError, match="not a usable checkpoint.*CLIPCOUNT_PUBLISHED_URL"):
        published.ensure_published(progress=False)
    assert not published.is_cached()
    assert not (environment / "clip-count-published.ckpt").exists()
    assert not list(environment.glob(".published.tmp-*"))


def test_offline_first_use_says_what_to_do_in_one_line(environment, monkeypatch, blob_image, tmp_path, capsys):
    from PIL import Image

    from clipcount.cli import main

    monkeypatch.setenv("CLIPCOUNT_PUBLISHED_URL", _closed_port_url())
    image = tmp_path / "photo.png"
    Image.fromarray(blob_image()).save(image)
    assert main(["count", str(image), "-p", "apples", "--model", "published"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipcount: error:")]
    assert len(errors) == 1
    message = errors[0]
    assert "could not be fetched" in message and "convert-official" in message
    assert "drive.google.com/file/d/17Dj0tjd29lPGOGYEF5IrE8aPClXUjTrR" in message
    assert str(environment / "published") in message and "CLIPCOUNT_PUBLISHED_URL" in message
