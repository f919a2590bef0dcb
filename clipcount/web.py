"""`clipcount serve`: a web page for counting, built with Gradio 6.

Drop an image, type what to count ("apples, red cars" or one prompt per line), and see each count
with its heat map and points; download the numbers as CSV or JSON.

Offline and private by default: no analytics, no share link, SSR off (it would need Node), bound to
127.0.0.1. Uploads are capped (`max_file_size`) and requests are queued and run one at a time (the
model is shared); a bad upload shows an error in the page and the server carries on.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcount.errors import ClipCountError, PromptError
from clipcount.imaging import IMAGE_EXTENSIONS, load_image

if TYPE_CHECKING:  # the API pulls in torch; `clipcount --help` imports this module for its defaults
    from clipcount.api import Counter, CountResult

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_SIZE = "25mb"
DEFAULT_QUEUE_SIZE = 32  # waiting requests beyond this are refused with "queue full"
_PREVIEW_SIDE = 768  # longest side of the upload's preview, in pixels
_KEEP_RESULT_FOLDERS = 64  # download files of this many recent requests are kept on disk

TITLE = "clipcount: count anything you can name"
INTRO = (
    "Drop an image, say what to count (several things: separate them with commas or new lines), "
    "and press **Count**. The heat map shows where the model sees the objects; dots mark one point per "
    "counted object."
)


def _gradio():
    """Import Gradio with its telemetry off (it reads the environment as it works)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    return gr


def parse_prompts(text: str | None) -> list[str]:
    """"apples, red cars" or one prompt per line (or ;) -> ["apples", "red cars"]; empty parts dropped."""
    from clipcount.api import check_prompt_list

    parts = [part.strip() for part in re.split(r"[,\n;]", text or "")]
    prompts = list(dict.fromkeys(part for part in parts if part))  # unique, in order
    if not prompts:
        raise PromptError("type what to count, e.g. 'apples' (several: separate them with commas)")
    return check_prompt_list(prompts)


@dataclass
class PageResult:
    """What one press of Count shows: a summary, one overlay per prompt, and two download files."""

    summary: str  # Markdown
    gallery: list[tuple[Any, str]]  # (PIL overlay, caption)
    table: list[list[Any]]  # rows of prompt, count, objects
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
            raise PromptError("upload an image first (drop it on the Image box or click it)")
        prompts = parse_prompts(prompt_text)
        name = Path(upload).name
        pixels = self.load(upload)
        results = self.counter.count_loaded(pixels, prompts)  # a list of CountResult, one per prompt
        csv_path, json_path = self._write_downloads(name, results)
        return PageResult(_summary(results), _gallery(pixels, results), _table(results), csv_path, json_path)

    def load(self, upload: str) -> np.ndarray:
        """The uploaded file as (H, W, 3) float32; errors name the file, not the server's temp path."""
        try:
            return load_image(upload, self.counter.limits)
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

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)


def _summary(results: list[CountResult]) -> str:
    from clipcount.visualize import format_count

    lines = [f"- {_escape_md(result.prompt)}: **{format_count(result.count)}**" for result in results]
    return "\n".join(lines)


def _gallery(pixels: np.ndarray, results: list[CountResult]) -> list[tuple[Any, str]]:
    from clipcount.visualize import format_count, overlay

    return [(overlay(pixels, r.density, r.points, r.count, r.prompt), f"{r.prompt}: {format_count(r.count)}")
            for r in results]


def _table(results: list[CountResult]) -> list[list[Any]]:
    return [[r.prompt, round(r.count, 2), len(r.points)] for r in results]


def _escape_md(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>])", r"\\\1", text)


# ---- the page ----------------------------------------------------------------------------------

def build_app(counter: Counter, page: PageCounter | None = None, max_file_size: str | int | None = None):
    """The Gradio Blocks of the page (not launched); max_file_size only labels the upload box."""
    gr = _gradio()
    page = page or PageCounter(counter)
    with gr.Blocks(title="clipcount", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        if counter.synthetic_only:
            from clipcount.models import demo_notice
            gr.Markdown(f"**Note:** {_escape_md(demo_notice())}", elem_id="clipcount-demo-notice")
        with gr.Row():
            with gr.Column(scale=1):
                limit = f" (up to {max_file_size})" if isinstance(max_file_size, str) else ""
                upload = gr.File(label=f"Image{limit}", file_types=sorted(IMAGE_EXTENSIONS), type="filepath",
                                 elem_id="clipcount-image")
                preview = gr.Image(label="Your image", interactive=False, type="numpy", height=280,
                                   buttons=["fullscreen"], elem_id="clipcount-preview")
                prompts = gr.Textbox(label="What to count", placeholder="apples, red cars", lines=2,
                                     elem_id="clipcount-prompts")
                button = gr.Button("Count", variant="primary", elem_id="clipcount-count")
            with gr.Column(scale=2):
                summary = gr.Markdown(elem_id="clipcount-counts")
                gallery = gr.Gallery(label="Heat maps", columns=2, height="auto", format="png", object_fit="contain",
                                     interactive=False, elem_id="clipcount-heatmaps")
                table = gr.Dataframe(headers=["prompt", "count", "objects"], label="Counts",
                                     interactive=False, elem_id="clipcount-table")
                with gr.Row():
                    csv_button = gr.DownloadButton("Download CSV", visible=False, elem_id="clipcount-csv")
                    json_button = gr.DownloadButton("Download JSON", visible=False, elem_id="clipcount-json")
        outputs = [summary, gallery, table, csv_button, json_button]
        upload.change(_preview_handler(page), inputs=upload, outputs=[preview, summary])
        gr.on([button.click, prompts.submit], _count_handler(gr, page), inputs=[upload, prompts], outputs=outputs,
              concurrency_limit=1, concurrency_id="clipcount-model")  # one model, one request at a time
    return app


def _error_markdown(error: ClipCountError, what: str = "Cannot count") -> str:
    """An error as the page shows it, in place of the counts."""
    return f"**{what}:** {_escape_md(str(error))}"


def _preview_handler(page: PageCounter):
    """On upload: a preview, or the reason the file cannot be counted, at once."""

    def preview(upload: str | None):
        try:
            return page.preview(upload), ""
        except ClipCountError as error:
            return None, _error_markdown(error, "Cannot use this file")

    return preview


def _count_handler(gr, page: PageCounter):
    """The Count button: summary, gallery, table and downloads; or an error in the summary's place."""

    def count(upload: str | None, prompt_text: str | None):
        try:
            result = page.count(upload, prompt_text)
        except ClipCountError as error:
            hidden = gr.DownloadButton(value=None, visible=False)
            return _error_markdown(error), [], [], hidden, hidden
        return (result.summary, result.gallery, result.table,
                gr.DownloadButton(value=result.csv_path, visible=True),
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
    app.launch(
        server_name=host, server_port=port, share=False, inbrowser=False, max_file_size=max_file_size,
        prevent_thread_lock=True, show_error=False, quiet=quiet, ssr_mode=False, mcp_server=False,
        footer_links=[],
    )
    server = Server(url=f"http://{_url_host(host)}:{app.server_port}/", app=app, page=page)
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
