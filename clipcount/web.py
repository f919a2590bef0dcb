"""`clipcount serve`: a web page for counting, built with Gradio 6.

Drop an image (or press "Try the example"), type what to count ("red circles, yellow stars" or one
thing per line), and see each count, large, above its heat map; download the numbers as CSV or
JSON. Prompts are split by the same rule as `clipcount count -p` (api.split_prompts).

The results are one HTML block, not a gallery: every heat map is shown whole, at most at its natural
size (it shrinks to fit a narrow window, never grows), with 1 or 10 prompts alike, and the count
appears once per prompt. Errors appear in the same place in a red box.

Offline and private by default: no analytics, no share link or share button, SSR off (it would need
Node), bound to 127.0.0.1. Uploads are capped (`max_file_size`) and requests are queued and run one
at a time (the model is shared); a bad upload shows an error in the page and the server carries on.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcount.errors import ClipCountError, PromptError
from clipcount.imaging import IMAGE_EXTENSIONS, load_image_sized
from clipcount.models import ASSETS

if TYPE_CHECKING:  # the API pulls in torch; `clipcount --help` imports this module for its defaults
    from clipcount.api import Counter, CountResult

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_SIZE = "25mb"
DEFAULT_QUEUE_SIZE = 32  # waiting requests beyond this are refused with "queue full"
_PREVIEW_SIDE = 768  # longest side of the upload's preview, in pixels
_HEATMAP_SIDE = 1024  # longest side of a heat map sent to the browser (bigger photos are shrunk, never grown)
_KEEP_RESULT_FOLDERS = 64  # download files of this many recent requests are kept on disk

EXAMPLE_IMAGE = ASSETS / "example.jpg"  # the bundled synthetic scene (clipcount demo counts it too)
EXAMPLE_PROMPTS = "red circles, yellow stars"

TITLE = "clipcount: count anything you can name"
INTRO = (
    "Drop an image, say what to count, and press **Count**. Several things at once: separate them with "
    "commas or put each on its own line (a thing named twice is counted once). Each count comes with a "
    "heat map of where the model sees those things, and a dot on each one it counted."
)
DEMO_NOTE = (
    "This page runs the small demo model. It has only seen computer-drawn scenes of coloured shapes "
    "(circles, squares, triangles, stars, hexagons and crosses in six colours), so it counts things like "
    "\"red circles\" or \"blue stars\" in such scenes; on real photos its numbers mean little. To count "
    "real photos, start this page with a model trained on them (the README says how)."
)
PLACEHOLDER_SHAPES = "e.g. red circles, yellow stars"
PLACEHOLDER_PHOTOS = "e.g. apples, red cars"


def _gradio():
    """Import Gradio with its telemetry off (it reads the environment as it works)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    return gr


def parse_prompts(text: str | None) -> list[str]:
    """What was typed in the box -> prompts, by the rule `clipcount count -p` uses (api.split_prompts)."""
    from clipcount.api import split_prompts

    if not (text or "").strip(" ,;\n\t"):
        raise PromptError("type what to count, e.g. 'apples' (several: separate them with commas)")
    return split_prompts(text or "")


@dataclass
class PageResult:
    """What one press of Count shows: the results block and two download files."""

    html: str  # one card per prompt: the count, large, above its heat map, plus the legend
    counts: list[tuple[str, float]]  # (prompt, count) in the order shown
    csv_path: str
    json_path: str


class PageCounter:
    """The work behind the page: counts one upload and writes its download files."""

    def __init__(self, counter: Counter, files_root: str | os.PathLike | None = None):
        self.counter = counter
        self._root = Path(files_root or tempfile.mkdtemp(prefix="clipcount-web-"))
        self._root.mkdir(parents=True, exist_ok=True)
        self._folders: deque[Path] = deque()
        self._lock = threading.Lock()  # the folder list is shared if concurrency is ever raised

    def count(self, upload: str | None, prompt_text: str | None) -> PageResult:
        """upload: the uploaded file's path; raises ClipCountError with a message for people."""
        if not upload:
            raise PromptError("choose an image first: drop it on the Image box, click the box, or press "
                              "\"Try the example\"")
        prompts = parse_prompts(prompt_text)
        name = Path(upload).name
        pixels, size = self.load_sized(upload)
        # as `clipcount count` does: points, width and height in the file's own pixel grid, even
        # when a big photo is counted reduced (ImageLimits.max_side_for_counting)
        results = self.counter.count_loaded(pixels, prompts, size)  # a list of CountResult, one per prompt
        csv_path, json_path = self._write_downloads(name, results)
        return PageResult(results_html(pixels, results), [(r.prompt, r.count) for r in results], csv_path, json_path)

    def load(self, upload: str) -> np.ndarray:
        """The uploaded file as (H, W, 3) float32 (reduced if it is very big; see `load_sized`)."""
        return self.load_sized(upload)[0]

    def load_sized(self, upload: str) -> tuple[np.ndarray, tuple[int, int]]:
        """The uploaded file as (H', W', 3) float32 as counted, and the file's own (H, W): larger when
        it was reduced for counting. Errors name the file, not the server's temp path."""
        try:
            return load_image_sized(upload, self.counter.limits)
        except ClipCountError as error:
            raise type(error)(str(error).replace(str(upload), Path(upload).name)) from None

    def preview(self, upload: str | None) -> np.ndarray | None:
        """A small uint8 copy (H', W', 3) of the upload to show at once; bad files fail here already."""
        if not upload:
            return None
        pixels = self.load(upload)
        step = max(1, int(np.ceil(max(pixels.shape[:2]) / _PREVIEW_SIDE)))
        return np.round(pixels[::step, ::step] * 255.0).astype(np.uint8)

    def _write_downloads(self, name: str, results: list[CountResult]) -> tuple[str, str]:
        from clipcount import __version__
        from clipcount.api import ROW_FIELDS
        from clipcount.engine.metrics import write_csv_atomic, write_json_atomic

        folder = self._new_folder()
        stem = re.sub(r"[^\w.-]+", "_", Path(name).stem) or "image"
        rows = [result.to_row(name) for result in results]
        csv_path, json_path = folder / f"counts-{stem}.csv", folder / f"counts-{stem}.json"
        write_csv_atomic(({key: row[key] for key in ROW_FIELDS} for row in rows), csv_path, ROW_FIELDS)
        write_json_atomic({"clipcount": __version__, "model": self.counter.source, "results": rows}, json_path)
        return str(csv_path), str(json_path)

    def _new_folder(self) -> Path:
        """A fresh folder for one request's files; the oldest beyond the last few are deleted."""
        with self._lock:
            folder = Path(tempfile.mkdtemp(dir=self._root))
            self._folders.append(folder)
            while len(self._folders) > _KEEP_RESULT_FOLDERS:
                shutil.rmtree(self._folders.popleft(), ignore_errors=True)
        return folder

    def example(self) -> str:
        """A copy of the bundled example image in the page's own folder (Gradio serves files from there)."""
        copy = self._root / EXAMPLE_IMAGE.name
        if not copy.is_file():
            shutil.copyfile(EXAMPLE_IMAGE, copy)
        return str(copy)

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)


# ---- the results block (HTML with inline styles: it must look the same in any Gradio theme) ------

_CARD = ("margin:0;padding:10px;border:1px solid #d0d0d8;border-radius:10px;background:#fafafc;"
         "max-width:100%;box-sizing:border-box;flex:0 1 auto")
_ERROR = ("display:flex;gap:12px;align-items:flex-start;padding:14px 16px;border:2px solid #c62828;"
          "border-radius:10px;background:#fdecea;color:#8e1010;font-size:1.05rem")


def results_html(pixels: np.ndarray, results: list[CountResult]) -> str:
    """The legend, then one card per prompt: "prompt: count" in large type above its heat map.

    pixels: the image as counted (H', W', 3); results: its CountResults (points in the file's grid)."""
    cards = "".join(_card(pixels, result) for result in results)
    reduced = reduced_note_html(results[0]) if results and results[0].downscaled else ""
    return (f'<div class="clipcount-results" style="display:flex;flex-direction:column;gap:12px">{legend_html()}'
            f'{reduced}<div style="display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start">{cards}</div></div>')


def reduced_note_html(result: CountResult) -> str:
    """One line saying that a big photo was counted reduced, and that the results are in its own pixels."""
    height, width = result.image_size
    counted_height, counted_width = result.density.shape[:2]
    return ('<p class="clipcount-reduced" style="margin:0;font-size:0.95rem">'
            f"This image ({width}&times;{height} pixels) was reduced to {counted_width}&times;{counted_height} "
            "for counting; the downloaded points, width and height are in its own pixels.</p>")


def _card(pixels: np.ndarray, result: CountResult) -> str:
    from clipcount.visualize import format_count, overlay

    # drawn on the image as counted: points go from the file's pixel grid to the counted one
    picture = _shrunk(overlay(pixels, result.density, result.points_on_density(), result.count, result.prompt,
                              caption=False))
    prompt = html.escape(result.prompt)
    return (
        f'<figure class="clipcount-card" style="{_CARD}">'
        f'<figcaption style="margin:0 0 8px 0;font-size:1.15rem;line-height:1.3">{prompt}: '
        f'<strong class="clipcount-count" style="font-size:2rem">{format_count(result.count)}</strong></figcaption>'
        f'<img class="clipcount-heatmap" src="{_data_url(picture)}" width="{picture.width}" height="{picture.height}" '
        f'alt="heat map of {prompt}" style="display:block;max-width:100%;height:auto"></figure>'
    )


def legend_html() -> str:
    """How to read a heat map: the colour ramp from few to many, and what a dot is."""
    from clipcount.visualize import POINT_FILL, POINT_HALO, POINT_RING, legend_colours

    ramp = ", ".join(legend_colours())
    dot = (f"display:inline-block;width:12px;height:12px;border-radius:50%;background:rgb{POINT_FILL};"
           f"border:3px solid rgb{POINT_RING};box-shadow:0 0 0 2px rgb{POINT_HALO},0 0 0 3px #999;vertical-align:middle")
    return (
        '<div class="clipcount-legend" style="display:flex;flex-wrap:wrap;gap:18px;align-items:center;font-size:0.95rem">'
        '<span>Heat map: <span style="vertical-align:middle">fewer</span> '
        f'<span style="display:inline-block;width:140px;height:14px;border-radius:3px;vertical-align:middle;'
        f'background:linear-gradient(to right, {ramp})"></span> <span style="vertical-align:middle">more</span>'
        ' (uncoloured: none)</span>'
        f'<span><span style="{dot}"></span> one counted object</span></div>'
    )


def error_html(message: str, what: str = "Cannot count") -> str:
    """An error as the page shows it, in place of the results: a red box that cannot be missed."""
    return (f'<div class="clipcount-error" role="alert" style="{_ERROR}">'
            '<span aria-hidden="true" style="font-size:1.6rem;line-height:1">&#9888;</span>'
            f'<div><strong style="display:block;font-size:1.15rem">{html.escape(what)}</strong>'
            f'{html.escape(message)}</div></div>')


def _shrunk(picture):
    """At most _HEATMAP_SIDE pixels on the longest side (a data URL of a 20 MP PNG would stall the page)."""
    from PIL import Image

    scale = _HEATMAP_SIDE / max(picture.size)
    if scale >= 1:
        return picture
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.LANCZOS)


def _data_url(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---- the page ----------------------------------------------------------------------------------

def build_app(counter: Counter, page: PageCounter | None = None, max_file_size: str | int | None = None):
    """The Gradio Blocks of the page (not launched); max_file_size only labels the upload box."""
    gr = _gradio()
    page = page or PageCounter(counter)
    with gr.Blocks(title="clipcount", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        if counter.synthetic_only:
            gr.Markdown(f"**About this model:** {DEMO_NOTE}", elem_id="clipcount-demo-notice")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                limit = f" (up to {max_file_size})" if isinstance(max_file_size, str) else ""
                upload = gr.File(label=f"Image{limit}", file_types=sorted(IMAGE_EXTENSIONS), type="filepath",
                                 elem_id="clipcount-image")
                example = gr.Button("Try the example", size="sm", elem_id="clipcount-example")
                preview = gr.Image(label="Your image", interactive=False, type="numpy", height=280,
                                   buttons=["fullscreen"], elem_id="clipcount-preview")
                placeholder = PLACEHOLDER_SHAPES if counter.synthetic_only else PLACEHOLDER_PHOTOS
                prompts = gr.Textbox(label="What to count", placeholder=placeholder, lines=2,
                                     info="Several things: separate them with commas or new lines.",
                                     elem_id="clipcount-prompts")
                button = gr.Button("Count", variant="primary", elem_id="clipcount-count")
            with gr.Column(scale=2):
                results = gr.HTML(elem_id="clipcount-counts", js_on_load=None)
                with gr.Row():
                    csv_button = gr.DownloadButton("Download CSV", visible=False, elem_id="clipcount-csv")
                    json_button = gr.DownloadButton("Download JSON", visible=False, elem_id="clipcount-json")
        outputs = [results, csv_button, json_button]
        example_prompts = EXAMPLE_PROMPTS if counter.synthetic_only else None
        example.click(lambda: (page.example(), example_prompts or gr.skip()), outputs=[upload, prompts])
        upload.change(_preview_handler(page), inputs=upload, outputs=[preview, results])
        gr.on([button.click, prompts.submit], _count_handler(gr, page), inputs=[upload, prompts], outputs=outputs,
              concurrency_limit=1, concurrency_id="clipcount-model")  # one model, one request at a time
    return app


def _preview_handler(page: PageCounter):
    """On upload: a preview, or the reason the file cannot be counted, at once."""

    def preview(upload: str | None):
        try:
            return page.preview(upload), ""
        except ClipCountError as error:
            return None, error_html(str(error), "Cannot use this file")

    return preview


def _count_handler(gr, page: PageCounter):
    """The Count button: the results block and downloads; or an error in the results' place."""

    def count(upload: str | None, prompt_text: str | None):
        try:
            result = page.count(upload, prompt_text)
        except ClipCountError as error:
            hidden = gr.DownloadButton(value=None, visible=False)
            return error_html(str(error)), hidden, hidden
        return (result.html, gr.DownloadButton(value=result.csv_path, visible=True),
                gr.DownloadButton(value=result.json_path, visible=True))

    return count


@dataclass
class Server:
    """A running page: its address, and how to stop it."""

    url: str
    app: Any
    page: PageCounter

    def close(self) -> None:
        self.app.close()
        self.page.close()


def serve(counter: Counter, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          max_file_size: str | int = DEFAULT_MAX_FILE_SIZE, queue_size: int = DEFAULT_QUEUE_SIZE,
          block: bool = True, quiet: bool = False) -> Server:
    """Start the page on http://host:port. block=False returns at once, the server in a thread."""
    page = PageCounter(counter)
    app = build_app(counter, page, max_file_size)
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    app.launch(  # quiet: Gradio's own banner suggests share=True, which has no place on a local page
        server_name=host, server_port=port, share=False, inbrowser=False, max_file_size=max_file_size,
        prevent_thread_lock=True, show_error=False, quiet=True, ssr_mode=False, mcp_server=False,
        footer_links=[],
    )
    server = Server(url=f"http://{_url_host(host)}:{app.server_port}/", app=app, page=page)
    if not quiet:
        print(f"clipcount: the counting page is at {server.url} (press Ctrl-C to stop it)", file=sys.stderr,
              flush=True)
    if block:
        try:
            app.block_thread()
        finally:
            page.close()
    return server


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
