"""`clipcount serve`: the counting web page (Gradio), offline and local by default."""

from __future__ import annotations

import argparse
import re
import sys

EXAMPLES = """examples:
  clipcount serve                                   # http://127.0.0.1:7860, the bundled demo model
  clipcount serve --model weights/clip-count-published --port 8080
  clipcount serve --host 0.0.0.0 --max-file-size 50mb   # reachable from other machines

Open the address it prints, drop an image, type what to count ("apples, red cars") and press Count.
Needs the web extra: pip install 'clipcount[web]'.
"""

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    from clipcount.web import DEFAULT_HOST, DEFAULT_MAX_FILE_SIZE, DEFAULT_PORT, DEFAULT_QUEUE_SIZE

    parser = subparsers.add_parser(
        "serve",
        help="start the counting web page",
        description="Serve a web page where you upload an image, type prompts and see each count with its "
        "heat map; results download as CSV or JSON. No analytics, no share link.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="demo",
                        help="model name, clipcount checkpoint folder or Hugging Face hub id (default: demo; "
                        "published: the released CLIP-Count, downloaded and converted on first use)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE,
                        help=f"largest upload accepted, e.g. 10mb (default {DEFAULT_MAX_FILE_SIZE})")
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                        help=f"requests that may wait while one is counted (default {DEFAULT_QUEUE_SIZE})")
    parser.add_argument("--stride", type=int, default=None, help="pixels between sliding windows")
    parser.add_argument("--windowing", choices=("clipcount", "published"), default=None,
                        help="how whole images are cut into windows and blended: clipcount's, or the published "
                        "evaluation's; default: the model's (published for the published model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    from clipcount.cli.count import add_image_options

    add_image_options(parser)
    parser.set_defaults(func=run)


_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def file_size(text: str) -> str:
    """An upload limit as Gradio takes it ('10mb'), checked here: Gradio only fails at launch."""
    found = re.fullmatch(r"\s*(\d+)\s*([kmgt]?b)\s*", str(text), flags=re.IGNORECASE)
    if found is None or int(found.group(1)) == 0:
        from clipcount.errors import ConfigError

        raise ConfigError(f"--max-file-size {text!r} is not a size; write it like 500kb, 10mb or 2gb")
    return f"{int(found.group(1))}{found.group(2).lower()}"


def run(args: argparse.Namespace) -> int:
    from clipcount.errors import ConfigError

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, not {args.port}")
    if args.queue_size < 1:
        raise ConfigError(f"--queue-size must be at least 1, not {args.queue_size}")
    max_file_size = file_size(args.max_file_size)  # before the model loads, not after
    web = _import_web()
    from clipcount.cli.count import _note, load_counter
    from clipcount.models import DEMO_NOTE, is_synthetic_only

    counter = load_counter(args)
    if args.host not in _LOCAL_HOSTS:
        print(f"clipcount: serving on {args.host}: anyone who can reach this machine can use the page",
              file=sys.stderr)
    try:
        # Gradio's own start-up lines include advice on public share links, which this local,
        # offline page does not offer: it stays quiet and the address is printed here instead.
        server = web.serve(counter, host=args.host, port=args.port, max_file_size=max_file_size,
                           queue_size=args.queue_size, block=False, quiet=True)
    except OSError as error:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({error}); "
                          "choose another port with --port") from None
    print(f"clipcount: the counting page is at {server.url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    if is_synthetic_only(args.model):
        _note(DEMO_NOTE, args)
    try:
        server.app.block_thread()
    finally:
        server.page.close()
    return 0


def _import_web():
    from clipcount.errors import ConfigError

    try:
        import gradio  # noqa: F401 - checked here for a clear message
    except ImportError:
        raise ConfigError("the web page needs Gradio: pip install 'clipcount[web]'") from None
    from clipcount import web

    return web
