"""`clipcount serve`: the page's logic, and the page itself in a real headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
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

from clipcount.cli import main
from clipcount.errors import ImageError, PromptError
from clipcount.web import PLACEHOLDER_PHOTOS, PageCounter, parse_prompts

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
    assert parse_prompts("apples, red cars\npears;Apples\n\n") == ["apples", "red cars", "pears"]


def test_command_line_splits_prompts_like_the_page(tiny_checkpoint, make_image, tmp_path, capsys):
    """One rule (api.split_prompts): `-p "a, b"` is two prompts, a prompt given twice is counted once."""
    image = make_image(tmp_path / "field.png")
    typed = "green stars, orange circles"
    assert main(["count", str(image), "-p", typed, "-p", "Green stars", "--model", str(tiny_checkpoint)]) == 0
    printed = [line.split("\t")[1] for line in capsys.readouterr().out.strip().splitlines()]
    assert printed == parse_prompts(typed + "\nGreen stars") == ["green stars", "orange circles"]


@pytest.mark.parametrize("text", ["", " , ,\n", None])
def test_no_prompt_is_an_error(text):
    with pytest.raises(PromptError, match="what to count"):
        parse_prompts(text)


def test_page_counts_and_writes_downloads(tiny_counter, make_image, tmp_path):
    page = PageCounter(tiny_counter, tmp_path / "files")
    image = make_image(tmp_path / "field.png")
    result = page.count(str(image), "dots, red discs")
    assert [prompt for prompt, _ in result.counts] == ["dots", "red discs"]
    assert result.html.count("<img") == 2 and result.html.count('class="clipcount-count"') == 2  # each count once
    with open(result.csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["prompt"] for row in rows] == ["dots", "red discs"] and rows[0]["image"] == "field.png"
    document = json.loads(Path(result.json_path).read_text())
    assert float(rows[0]["count"]) == pytest.approx(document["results"][0]["count"])


def test_page_heat_maps_are_never_enlarged(tiny_counter, make_image, tmp_path):
    """A small image's heat map is sent at its own size; a big one is shrunk to the page's limit."""
    from PIL import Image

    from clipcount.web import _HEATMAP_SIDE

    page = PageCounter(tiny_counter, tmp_path / "files")
    for height, width in ((96, 128), (300, 3000)):
        html = page.count(str(make_image(tmp_path / f"{width}.png", height, width)), "dots").html
        shown = Image.open(io.BytesIO(base64.b64decode(html.split("base64,")[1].split('"')[0])))
        assert shown.width == min(width, _HEATMAP_SIDE) and f'width="{shown.width}"' in html


def test_prompts_and_errors_are_escaped(tiny_counter, make_image, tmp_path):
    from clipcount.web import error_html

    page = PageCounter(tiny_counter, tmp_path / "files")
    html = page.count(str(make_image(tmp_path / "f.png")), "<b>dots</b>").html
    assert "<b>dots" not in html and "&lt;b&gt;dots" in html
    assert "<script>" not in error_html("<script>alert(1)</script>")


def test_page_errors_name_the_upload_not_the_server_path(tiny_counter, tmp_path):
    upload = tmp_path / "server-temp-123" / "holiday.jpg"
    upload.parent.mkdir()
    upload.write_text("not a picture")
    page = PageCounter(tiny_counter, tmp_path / "files")
    with pytest.raises(ImageError) as caught:
        page.count(str(upload), "dots")
    assert "holiday.jpg" in str(caught.value) and "server-temp-123" not in str(caught.value)
    with pytest.raises(PromptError, match="choose an image first"):
        page.count(None, "dots")


def test_preview_is_small_uint8(tiny_counter, make_image, tmp_path):
    page = PageCounter(tiny_counter, tmp_path / "files")
    preview = page.preview(str(make_image(tmp_path / "wide.png", 200, 2000)))
    assert preview.dtype == np.uint8 and preview.shape[2] == 3 and max(preview.shape[:2]) <= 768
    assert page.preview(None) is None


def test_page_counts_big_photos_in_their_own_pixel_grid(tiny_checkpoint, tiny_counter, make_image, tmp_path):
    """A photo wider than the page counts at (4096 px) is counted reduced, as `clipcount count` does:
    points, width and height in the file's own pixels, and one line on the page says so."""
    from clipcount.imaging import ImageLimits

    height, width = 120, 5000
    limit = ImageLimits().max_side_for_counting
    assert width > limit
    image = make_image(tmp_path / "panorama.png", height, width)
    result = PageCounter(tiny_counter, tmp_path / "files").count(str(image), "dots")
    (row,) = json.loads(Path(result.json_path).read_text())["results"]
    assert (row["width"], row["height"]) == (width, height)
    with open(result.csv_path, newline="") as handle:
        (line,) = csv.DictReader(handle)
    assert (int(line["width"]), int(line["height"])) == (width, height)
    expected = tiny_counter.count(str(image), "dots")  # the Python API: the file's pixel grid
    assert len(expected.points) > 0 and row["points"] == np.round(expected.points, 1).tolist()
    assert max(x for x, _ in row["points"]) > limit  # not squeezed into the reduced grid
    assert result.html.count('class="clipcount-reduced"') == 1 and f"{width}&times;{height}" in result.html
    small = PageCounter(tiny_counter, tmp_path / "files").count(str(make_image(tmp_path / "small.png")), "dots")
    assert "clipcount-reduced" not in small.html


def test_serve_max_pixels_reaches_the_page(tiny_checkpoint, make_image, tmp_path):
    """`serve --max-pixels N`: the page refuses bigger uploads, naming the limit and the flag."""
    from clipcount.cli import build_parser
    from clipcount.cli.count import load_counter

    args = build_parser().parse_args(["serve", "--model", str(tiny_checkpoint), "--max-pixels", "5000",
                                      "--device", "cpu"])
    page = PageCounter(load_counter(args), tmp_path / "files")
    with pytest.raises(ImageError, match=r"more than the limit of 5,000.*--max-pixels"):
        page.count(str(make_image(tmp_path / "big.png", 96, 128)), "dots")
    assert page.count(str(make_image(tmp_path / "ok.png", 40, 120)), "dots").counts

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


def _flat_picture(path: Path, height: int, width: int) -> Path:
    """Discs on a plain background: compresses to a few KB, under the page's small test upload limit."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (width, height), (30, 40, 60))
    draw = ImageDraw.Draw(picture)
    for i in range(12):
        x, y = (37 * i * 7) % width, (53 * i * 5) % height
        draw.ellipse((x, y, x + 14, y + 14), fill=(230, 60, 50))
    picture.save(path)
    assert path.stat().st_size < 50_000
    return path


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
    assert len(notes) == 1 and "coloured shapes" in notes[0].value
    box = next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == "clipcount-prompts")
    assert box.placeholder == "e.g. red circles, yellow stars"  # what this model knows


def test_page_text_is_written_for_people_in_a_browser(tiny_counter, monkeypatch):
    """No command-line syntax on the page: no backticks, no --flags, no Python."""
    pytest.importorskip("gradio")
    from clipcount.web import build_app

    for synthetic in (False, True):
        monkeypatch.setattr(tiny_counter, "synthetic_only", synthetic)
        texts = [str(getattr(block, attr, "") or "") for block in build_app(tiny_counter).blocks.values()
                 for attr in ("value", "label", "placeholder", "info") if isinstance(getattr(block, attr, None), str)]
        for text in texts:
            assert "`" not in text and " --" not in text and "from_pretrained" not in text, text


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
        _wait_for_output(process, "127.0.0.1")  # the address line follows the server's start
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    output = getattr(process, "seen", "") + output
    assert "127.0.0.1" in output and "gradio.live" not in output and "share=True" not in output


def _wait_for_output(process: subprocess.Popen, text: str, timeout: float = 60.0) -> None:
    """Read the process's output until a line holds `text` (kept for the assertions after it stops)."""
    import select

    deadline = time.monotonic() + timeout
    process.seen = ""  # type: ignore[attr-defined]
    while time.monotonic() < deadline and text not in process.seen:  # type: ignore[attr-defined]
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            process.seen += process.stdout.readline()  # type: ignore[attr-defined]


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


_HEATMAP_BOXES = """() => [...document.querySelectorAll('#clipcount-counts img.clipcount-heatmap')].map(img => {
    const r = img.getBoundingClientRect();
    let clipped = false;  // cut off by any box around it that hides overflow
    for (let e = img.parentElement; e && e !== document.documentElement; e = e.parentElement) {
        const s = getComputedStyle(e);
        if ([s.overflow, s.overflowX, s.overflowY].some(v => v !== 'visible')) {
            const b = e.getBoundingClientRect();
            if (r.top < b.top - 1 || r.bottom > b.bottom + 1 || r.left < b.left - 1 || r.right > b.right + 1) clipped = true;
        }
    }
    return {width: r.width, height: r.height, natural: [img.naturalWidth, img.naturalHeight], clipped,
            shown: img.complete && r.width > 0 && getComputedStyle(img).visibility === 'visible'};
})"""


def _heat_map_boxes(page, n: int) -> list[dict]:
    page.wait_for_function(f"() => document.querySelectorAll('#clipcount-counts img.clipcount-heatmap').length === {n}"
                           " && [...document.querySelectorAll('#clipcount-counts img')].every(i => i.complete)",
                           timeout=60_000)
    return page.evaluate(_HEATMAP_BOXES)


def _assert_whole_and_not_enlarged(box: dict) -> None:
    natural_width, natural_height = box["natural"]
    assert box["shown"] and not box["clipped"], box
    assert box["width"] <= natural_width + 0.5 and box["height"] <= natural_height + 0.5, box  # never enlarged
    assert box["width"] / box["height"] == pytest.approx(natural_width / natural_height, rel=0.02), box  # whole


@pytest.mark.browser
def test_count_in_the_browser(page, server, tiny_counter, make_image, tmp_path):
    from clipcount.visualize import format_count

    assert page.locator("#clipcount-prompts textarea").get_attribute("placeholder") == PLACEHOLDER_PHOTOS
    image = _flat_picture(tmp_path / "field.png", 300, 420)
    _upload(page, image)
    page.locator("#clipcount-preview img").wait_for(timeout=30_000)  # the preview appears on upload
    _count(page, "dots, red discs")
    shown = _shown_counts(page, ["dots", "red discs"])
    expected = tiny_counter.count(image, ["dots", "red discs"])
    for result in expected:  # each count shown once, as "prompt: count"
        assert shown.count(f"{result.prompt}: {format_count(result.count)}") == 1
    for box in _heat_map_boxes(page, 2):
        _assert_whole_and_not_enlarged(box)
        assert box["natural"] == [420, 300]
    _settled_screenshot(page, "count.png")
    with page.expect_download(timeout=30_000) as download:
        page.locator("#clipcount-csv").click()
    rows = list(csv.DictReader(open(download.value.path(), newline="")))
    assert [row["prompt"] for row in rows] == ["dots", "red discs"]


@pytest.mark.browser
def test_three_prompts_all_shown_whole_in_a_narrow_window(page, tmp_path):
    """Every result visible with 3+ prompts; a window narrower than the photo shrinks it, whole."""
    page.set_viewport_size({"width": 900, "height": 800})
    _upload(page, _flat_picture(tmp_path / "wide.png", 500, 1400))
    _count(page, "dots, red discs, blue squares")
    _shown_counts(page, ["dots", "red discs", "blue squares"])
    boxes = _heat_map_boxes(page, 3)
    for box in boxes:
        _assert_whole_and_not_enlarged(box)
        assert box["width"] < 1400  # shrunk to fit the column
    _settled_screenshot(page, "three-prompts.png", full_page=True)


@pytest.mark.browser
def test_example_is_one_click_away_and_there_is_no_share_button(page):
    page.locator("#clipcount-example").click()
    page.locator("#clipcount-preview img").wait_for(timeout=30_000)
    _count(page, "dots")
    _shown_counts(page, ["dots"])
    _assert_whole_and_not_enlarged(_heat_map_boxes(page, 1)[0])
    legend = page.locator("#clipcount-counts .clipcount-legend")
    assert legend.is_visible() and "one counted object" in legend.inner_text()
    assert page.locator("button[aria-label*='share' i], button[title*='share' i]").count() == 0
    _settled_screenshot(page, "example.png", full_page=True)


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
    _assert_error_stands_out(page)
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


def _assert_error_stands_out(page) -> None:
    """The error is in view, in a red box with large enough text: not a plain small line."""
    box = page.locator("#clipcount-counts .clipcount-error")
    assert box.is_visible() and box.get_attribute("role") == "alert"
    style = box.evaluate("e => { const s = getComputedStyle(e); const r = e.getBoundingClientRect();"
                         " return {border: s.borderTopColor, width: parseFloat(s.borderTopWidth), background:"
                         " s.backgroundColor, size: parseFloat(s.fontSize), top: r.top, bottom: r.bottom,"
                         " height: innerHeight}; }")
    red, green, blue = (int(v) for v in style["border"][style["border"].index("(") + 1:-1].split(",")[:3])
    assert red > 150 and green < 100 and blue < 100 and style["width"] >= 2, style
    assert style["background"] != "rgba(0, 0, 0, 0)" and style["size"] >= 15, style
    assert 0 <= style["top"] and style["bottom"] <= style["height"], style  # on screen without scrolling


def _settled_screenshot(page, name: str, full_page: bool = False) -> None:
    """A screenshot once the results area has faded back in (Gradio dims outputs while pending)."""
    page.wait_for_function(
        "() => { for (let e = document.querySelector('#clipcount-counts'); e; e = e.parentElement)"
        " if (getComputedStyle(e).opacity !== '1') return false; return true; }", timeout=10_000)
    SCREENS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENS / name), full_page=full_page)  # the viewport: pop-ups are fixed to it


def _reload(page) -> None:
    page.reload()
    page.wait_for_selector("#clipcount-count")
