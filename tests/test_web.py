"""`clipcount serve`: the page's logic, and the page itself in a real headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from clipcount.errors import ImageError, PromptError
from clipcount.web import PageCounter, parse_prompts

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENS = Path("/tmp/clipcount-screens")
REPO = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = "100kb"

# Gradio's own pandas use warns under pandas 3; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


# ---- the page's logic ---------------------------------------------------------------------------

def test_prompts_split_on_commas_and_lines():
    assert parse_prompts("apples, red cars\npears;apples\n\n") == ["apples", "red cars", "pears"]


@pytest.mark.parametrize("text", ["", " , ,\n", None])
def test_no_prompt_is_an_error(text):
    with pytest.raises(PromptError, match="what to count"):
        parse_prompts(text)


def test_page_counts_and_writes_downloads(tiny_counter, make_image, tmp_path):
    page = PageCounter(tiny_counter, tmp_path / "files")
    image = make_image(tmp_path / "field.png")
    result = page.count(str(image), "dots, red discs")
    assert [caption.split(":")[0] for _, caption in result.gallery] == ["dots", "red discs"]
    assert "dots" in result.summary and "red discs" in result.summary
    with open(result.csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["prompt"] for row in rows] == ["dots", "red discs"] and rows[0]["image"] == "field.png"
    document = json.loads(Path(result.json_path).read_text())
    assert float(rows[0]["count"]) == pytest.approx(document["results"][0]["count"])
    assert result.table[0][0] == "dots"


def test_page_errors_name_the_upload_not_the_server_path(tiny_counter, tmp_path):
    upload = tmp_path / "server-temp-123" / "holiday.jpg"
    upload.parent.mkdir()
    upload.write_text("not a picture")
    page = PageCounter(tiny_counter, tmp_path / "files")
    with pytest.raises(ImageError) as caught:
        page.count(str(upload), "dots")
    assert "holiday.jpg" in str(caught.value) and "server-temp-123" not in str(caught.value)
    with pytest.raises(PromptError, match="upload an image"):
        page.count(None, "dots")


def test_preview_is_small_uint8(tiny_counter, make_image, tmp_path):
    page = PageCounter(tiny_counter, tmp_path / "files")
    preview = page.preview(str(make_image(tmp_path / "wide.png", 200, 2000)))
    assert preview.dtype == np.uint8 and preview.shape[2] == 3 and max(preview.shape[:2]) <= 768
    assert page.preview(None) is None


# ---- the page in a browser ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright; skipped (with the reason) where either is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright)")
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tiny_counter):
    """The page, served from this process on a free local port, uploads capped at UPLOAD_LIMIT."""
    pytest.importorskip("gradio")
    from clipcount.web import serve

    running = serve(tiny_counter, host="127.0.0.1", port=_free_port(), max_file_size=UPLOAD_LIMIT,
                    block=False, quiet=True)
    yield running
    running.close()


@pytest.fixture
def page(browser, server):
    tab = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    tab.goto(server.url)
    tab.wait_for_selector("#clipcount-count")
    yield tab
    tab.close()


def _upload(page, path: Path) -> None:
    page.locator("#clipcount-image input[type=file]").set_input_files(str(path))


def _count(page, prompts: str) -> None:
    page.locator("#clipcount-prompts textarea").fill(prompts)
    page.locator("#clipcount-count").click()


def _toast_text(page, contains: str) -> str:
    """The text of Gradio's own error pop-up (upload refused by the browser side) holding `contains`."""
    toast = page.locator("[data-testid=toast-body]", has_text=contains).first
    toast.wait_for(state="visible", timeout=30_000)
    page.wait_for_function(  # it fades in; wait until it can be read (and photographed)
        "() => [...document.querySelectorAll('[data-testid=toast-body]')]"
        ".some(e => getComputedStyle(e).opacity === '1')", timeout=10_000)
    return toast.inner_text()


def _page_error(page, contains: str, kind: str = "Cannot count") -> str:
    """The text of our error message, shown where the counts go, once it holds `contains`.

    kind: "Cannot count" after pressing Count, "Cannot use this file" right after an upload."""
    page.wait_for_function(
        "args => { const [kind, text] = args; const e = document.querySelector('#clipcount-counts');"
        " return e && e.innerText.includes(kind) && e.innerText.includes(text); }",
        arg=[kind, contains], timeout=30_000)
    return page.locator("#clipcount-counts").inner_text()


def _shown_counts(page, prompts: list[str]) -> str:
    page.wait_for_function(
        "names => { const e = document.querySelector('#clipcount-counts');"
        " return e && names.every(n => e.innerText.includes(n + ':')); }",
        arg=prompts, timeout=60_000)
    return page.locator("#clipcount-counts").inner_text()


def test_demo_model_page_says_what_the_model_is(tiny_counter, monkeypatch):
    pytest.importorskip("gradio")
    from clipcount.web import build_app

    monkeypatch.setattr(tiny_counter, "synthetic_only", True)
    app = build_app(tiny_counter)
    notes = [block for block in app.blocks.values() if getattr(block, "elem_id", None) == "clipcount-demo-notice"]
    assert len(notes) == 1 and "synthetic shapes" in notes[0].value


def test_serve_command_starts_offline_on_localhost(tiny_checkpoint, tmp_path):
    """`python -m clipcount serve` for real: it answers on 127.0.0.1 and stops when asked."""
    pytest.importorskip("gradio")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the command must switch analytics off by itself
    process = subprocess.Popen(
        [sys.executable, "-m", "clipcount", "serve", "--model", str(tiny_checkpoint), "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        page = _wait_for_page(f"http://127.0.0.1:{port}/", process)
        assert "clipcount" in page
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "127.0.0.1" in output and "gradio.live" not in output


def _wait_for_page(url: str, process: subprocess.Popen, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"clipcount serve exited early:\n{process.communicate()[0]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode("utf-8", "replace")
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"clipcount serve did not answer on {url} within {timeout:.0f} s")


def test_settings_are_offline_and_local(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert server.app.analytics_enabled is False
    assert server.app.share is False
    assert server.app.enable_queue


@pytest.mark.browser
def test_count_in_the_browser(page, server, tiny_counter, make_image, tmp_path):
    from clipcount.visualize import format_count

    image = make_image(tmp_path / "field.png", 96, 128)
    _upload(page, image)
    page.locator("#clipcount-preview img").wait_for(timeout=30_000)  # the preview appears on upload
    _count(page, "dots, red discs")
    shown = _shown_counts(page, ["dots", "red discs"])
    expected = tiny_counter.count(image, ["dots", "red discs"])
    assert f"dots: {format_count(expected[0].count)}" in shown
    assert f"red discs: {format_count(expected[1].count)}" in shown
    page.locator("#clipcount-heatmaps img").first.wait_for(timeout=30_000)
    _settled_screenshot(page, "count.png")
    with page.expect_download(timeout=30_000) as download:
        page.locator("#clipcount-csv").click()
    rows = list(csv.DictReader(open(download.value.path(), newline="")))
    assert [row["prompt"] for row in rows] == ["dots", "red discs"]


@pytest.mark.browser
def test_bad_uploads_show_an_error_and_the_server_keeps_serving(page, make_image, tmp_path):
    from PIL import Image

    big = tmp_path / "huge.png"  # random pixels do not compress: well over UPLOAD_LIMIT
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(big)
    _upload(page, big)
    assert "huge.png" in _toast_text(page, "maximum allowed size")
    _settled_screenshot(page, "error-oversized.png")

    _reload(page)
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is a text file with an image's name")
    _upload(page, fake)
    assert "not an image" in _page_error(page, "holiday.jpg", "Cannot use this file")  # said on upload
    _count(page, "dots")
    assert "not an image" in _page_error(page, "holiday.jpg")
    _settled_screenshot(page, "error.png")

    _reload(page)
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: apples")
    _upload(page, notes)
    assert "notes.txt" in _toast_text(page, "file type")

    _reload(page)  # still serving: an empty prompt is an error, a good image and prompt count as before
    _upload(page, make_image(tmp_path / "good.png"))
    _count(page, " , ")
    _page_error(page, "what to count")
    _count(page, "dots")
    assert "dots:" in _shown_counts(page, ["dots"])


def _settled_screenshot(page, name: str) -> None:
    """A screenshot once the results area has faded back in (Gradio dims outputs while pending)."""
    page.wait_for_function(
        "() => { for (let e = document.querySelector('#clipcount-counts'); e; e = e.parentElement)"
        " if (getComputedStyle(e).opacity !== '1') return false; return true; }", timeout=10_000)
    SCREENS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENS / name))  # the viewport: Gradio's pop-ups are fixed to it


def _reload(page) -> None:
    page.reload()
    page.wait_for_selector("#clipcount-count")
