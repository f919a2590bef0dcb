"""The `clipcount` command: a thin dispatcher; each sub-command lives in its own module with a
`register(subparsers)` function that adds its parser and sets `func(args) -> int` (the exit code)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from clipcount.errors import ClipCountError

# sub-command modules, in the order `clipcount --help` lists them
COMMANDS = ("count", "demo", "serve", "train", "evaluate", "convert", "synthetic", "experiments")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in one line (exit 2) like every other clipcount error."""

    def error(self, message: str):
        self.exit(2, f"clipcount: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from clipcount import __version__

    parser = _Parser(
        prog="clipcount",
        description="Text-guided zero-shot object counting (CLIP-Count).",
        epilog="Run `clipcount COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"clipcount {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"clipcount.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"clipcount.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning (a skipped image, say) as one line for people: no source file and line."""
    print(f"clipcount: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores Python's own display when the command ends
            warnings.showwarning = _warning_line
            return int(args.func(args) or 0)
    except ClipCountError as error:
        print(f"clipcount: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipcount: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
