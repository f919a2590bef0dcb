"""`clipcount count`: count what prompts describe in images, folders and glob patterns.

Design, for folders of thousands of images and runs that get interrupted:
- Images are decoded one at a time (the next one in a background thread), never all at once.
- Results go, row by row, to a journal beside the output file (`.NAME.clipcount-partial.jsonl`).
  The output files themselves are written only at the end, each in one atomic step: they are
  complete or absent, never half-written. If a run dies, its journal stays, and `--resume` reads
  the previous complete output and the journal, and counts only what is missing.
- A bad image (missing, corrupt, not an image) costs one line on stderr and an error row in the
  output; the other images are still counted and the exit code is 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  clipcount count orchard.jpg -p apples
  clipcount count orchard.jpg -p apples -p pears --overlay overlays/
  clipcount count orchard.jpg -p "apples, pears"                 # the same two prompts, as the web page reads them
  clipcount count photos/ -p "red cars" --csv counts.csv
  clipcount count 'shots/**/*.png' -p people --json counts.json --resume
  clipcount count photos/ -p cells --json - --model weights/clip-count-published
  clipcount count big.jpg -p birds --device cpu --precision fp32 --stride 64

Output: one line per image and prompt (image, prompt, count, tab-separated) unless --json - or
--csv - sends a table to stdout. Bad images are reported on stderr and as rows with an `error`
field; the others are still counted, and the exit code is then 2.
"""

FEW_IMAGES = 3  # more than this many images get a progress bar (on a terminal)
STDOUT = "-"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "count",
        help="count objects described by text prompts in images",
        description="Count what each prompt describes in each image: a number, and optionally the "
        "density heat map with the object points drawn on the image.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE|FOLDER|GLOB",
                        help="image files, folders (searched recursively) or quoted glob patterns")
    parser.add_argument("-p", "--prompt", action="append", required=True, metavar="PROMPT",
                        help="what to count, e.g. 'apples'; several: repeat -p or separate them with commas "
                        "('apples, red cars'); a prompt given twice is counted once")
    parser.add_argument("--json", metavar="FILE", help="write results as JSON to FILE ('-' for stdout)")
    parser.add_argument("--csv", metavar="FILE", help="write results as CSV to FILE ('-' for stdout)")
    parser.add_argument("--overlay", metavar="DIR",
                        help="write a heat-map overlay with the count and points per image and prompt to DIR")
    parser.add_argument("--resume", action="store_true",
                        help="skip images already counted in the --json/--csv FILE "
                        "(and in an interrupted run's journal)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over, discarding what an interrupted run into the same FILE saved "
                        "(without --resume or --overwrite such a run is refused, so nothing is lost unasked)")
    parser.add_argument("--model", default="demo",
                        help="model name, clipcount checkpoint folder or Hugging Face hub id (default: demo, "
                        "the bundled model trained on synthetic shapes; published: the released CLIP-Count, "
                        "for real photos, downloaded and converted on first use)")
    parser.add_argument("--stride", type=int, default=None,
                        help="pixels between sliding windows (default: a third of the window, 128 for 384)")
    parser.add_argument("--windowing", choices=("clipcount", "published"), default=None,
                        help="how whole images are cut into windows and blended: clipcount's, or the published "
                        "evaluation's; default: the model's (published for the published model)")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="auto: bf16 on a GPU; float32 on a CPU, with the heaviest matmuls in bf16 where "
                             "the CPU has native bf16 (counts within 0.5%% of float32)")
    add_image_options(parser)
    parser.set_defaults(func=run)


def add_image_options(parser: argparse.ArgumentParser) -> None:
    """--max-pixels and --quiet, shared by count, eval and serve."""
    from clipcount.imaging import ImageLimits

    default = ImageLimits().max_pixels
    parser.add_argument("--max-pixels", type=pixel_count, default=default, metavar="N",
                        help=f"refuse images with more pixels than this, unread (decompression bombs); "
                        f"default {default:,} ({default / 1e6:.0f} MP); e.g. 300M")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print results and errors only, no notes (demo model, downscaling, resuming)")


def pixel_count(text: str) -> int:
    """'200000000', '200_000_000', '200M' or '200MP' -> 200000000 (an argparse type)."""
    cleaned = text.strip().upper().replace("_", "").replace(",", "")
    scale = 1
    for suffix in ("MP", "M"):
        if cleaned.endswith(suffix):
            cleaned, scale = cleaned[: -len(suffix)], 1_000_000
            break
    try:
        value = round(float(cleaned) * scale)
    except ValueError:
        value = 0
    if value < 1 or not cleaned:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of pixels; write it like 200000000 or 200M")
    return value


def image_limits(args: argparse.Namespace):
    """The ImageLimits of --max-pixels. Pillow refuses files over twice its own (process-wide)
    limit before clipcount can look at them; a command that asks for more raises that limit for
    its own process, so that --max-pixels is the one limit that decides."""
    from PIL import Image

    from clipcount.imaging import ImageLimits

    limits = ImageLimits(max_pixels=args.max_pixels)
    if Image.MAX_IMAGE_PIXELS is not None and limits.max_pixels >= 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels // 2 + 1
    return limits


# ---- the command -------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from clipcount.api import split_prompts
    from clipcount.imaging import list_images

    from clipcount.models import DEMO_NOTE, is_synthetic_only

    prompts = split_prompts(args.prompt)
    limits = image_limits(args)
    shard = Shard.from_env()
    outputs = Outputs.from_args(args, shard)
    if not args.resume:
        outputs.check_no_saved_progress(args.overwrite)
    paths, missing = list_images(args.inputs)  # missing: one line per input that matched nothing
    previous = outputs.previous_rows() if args.resume else {}
    done = completed_images(previous.values(), prompts)
    todo = [path for path in shard.take(paths) if str(path) not in done]
    if args.resume and done:
        _note(f"resuming: {len(paths) - len(todo)} of {len(paths)} images already counted", args)
    journal = Journal(outputs.journal_path(), shard.own_rows(previous.values(), paths))
    failures = _report_missing(missing, prompts, journal) if shard.rank == 0 else 0
    try:
        if todo:
            failures += _count_images(args, todo, prompts, paths, journal, outputs, shard, limits)
    except KeyboardInterrupt:
        if journal.path is not None:
            _note("stopped; rerun the same command with --resume to count the rest")
        raise
    rows = shard.merge(journal.rows(), outputs, paths)
    if rows is not None:  # rank 0, or the only process
        outputs.write(rows, args, prompts)
    journal.remove()
    if todo and is_synthetic_only(args.model) and shard.rank == 0:
        _note(DEMO_NOTE, args)  # after the results, so that an error above stays the first line
    return 2 if shard.any_failed(failures) else 0


@dataclass
class Shard:
    """This process's part of a `torchrun` (or any RANK/WORLD_SIZE launcher) run.

    Rank r counts images r, r + W, r + 2W, ... and writes its rows to its own part file; rank 0
    waits for every part and merges them into the one output, in input order. A single process
    is rank 0 of 1 and does none of this.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    context: Any = None

    @classmethod
    def from_env(cls) -> "Shard":
        from clipcount.engine.distributed import env_context, init_from_env

        ctx = env_context()
        if ctx.world_size <= 1:
            return cls()
        ctx = init_from_env(backend="gloo")  # the rows travel as files; gloo only synchronises
        return cls(ctx.rank, ctx.world_size, ctx.local_rank, ctx)

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def take(self, paths: list[Path]) -> list[Path]:
        return paths[self.rank :: self.world_size]

    def device(self, requested: str) -> str:
        import torch

        if self.sharded and requested == "auto" and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return requested

    def part_path(self, outputs: "Outputs", rank: int) -> Path:
        primary = outputs.primary_file()
        return primary.with_name(f".{primary.name}.part-{rank}-of-{self.world_size}.jsonl")

    def merge(self, rows: list[dict[str, Any]], outputs: "Outputs", paths: list[Path]) -> list[dict[str, Any]] | None:
        """All rows in input order on rank 0 (None on the other ranks)."""
        if not self.sharded:
            return rows
        from clipcount.engine.distributed import barrier, shutdown
        from clipcount.imaging import atomic_write

        with atomic_write(self.part_path(outputs, self.rank), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        barrier(self.context)
        merged = None
        if self.rank == 0:
            parts = [self.part_path(outputs, rank) for rank in range(self.world_size)]
            merged = [row for part in parts for row in read_journal(part)]
            order = {str(path): index for index, path in enumerate(paths)}
            merged.sort(key=lambda row: order.get(str(row["image"]), -1))  # stable: prompt order kept
            for part in parts:
                part.unlink(missing_ok=True)
        barrier(self.context)
        shutdown(self.context)
        return merged

    def any_failed(self, failures: int) -> bool:
        return failures > 0

    def own_rows(self, rows: Iterable[dict[str, Any]], paths: list[Path]) -> list[dict[str, Any]]:
        """The earlier rows this rank carries into its part: its own images' (rank 0: also inputs
        that matched no image), so that every row lands in exactly one part."""
        if not self.sharded:
            return list(rows)
        mine = {str(path) for path in self.take(paths)}
        known = {str(path) for path in paths}
        return [row for row in rows if str(row["image"]) in mine or (self.rank == 0 and str(row["image"]) not in known)]


def _count_images(args, todo: list[Path], prompts: list[str], all_paths: list[Path],
                  journal: "Journal", outputs: "Outputs", shard: Shard, limits) -> int:
    """Count `todo`, journaling rows and printing lines as they come; returns the number of failures."""
    from tqdm import tqdm

    from clipcount.api import PromptCutWarning, prompt_cut_message

    counter = load_counter(args, shard.device(args.device), limits)
    for prompt, kept in counter.cut_prompts(prompts).items():
        _note(f"note: {prompt_cut_message(prompt, kept)}", args)
    overlay_names = _overlay_names(all_paths, prompts) if args.overlay else {}
    show_bar = len(todo) > FEW_IMAGES and sys.stderr.isatty()
    failures, told_downscaled = 0, False
    with tqdm(total=len(todo), unit="image", disable=not show_bar, file=sys.stderr) as bar, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptCutWarning)  # said once above, as a note
        for item in counter.count_many(todo, prompts):
            rows = item.to_rows(prompts)
            journal.add(rows)
            if item.error is not None:
                failures += 1
                bar.write(f"clipcount: error: {item.error}", file=sys.stderr)
            else:
                if item.downscaled and not told_downscaled and not args.quiet:
                    bar.write(f"clipcount: {_downscaled_note(item, limits)}", file=sys.stderr)
                    told_downscaled = True
                if args.overlay:
                    _write_overlays(item, Path(args.overlay), overlay_names[str(item.source)])
                if not outputs.uses_stdout:
                    for row in rows:
                        bar.write(format_line(row), file=sys.stdout)
            bar.update(1)
    return failures


def _downscaled_note(item, limits) -> str:
    height, width = item.results[0].image_size
    counted_height, counted_width = item.results[0].density.shape[:2]
    return (f"note: {item.name} ({width}x{height}) was counted at {counted_width}x{counted_height}, as is "
            f"every image over {limits.max_side_for_counting} px; points, width and height are in its own pixels")


def load_counter(args, device: str | None = None, limits=None):
    """The Counter for --model, --device, --precision, --stride and --max-pixels. The demo model's
    Python warning is dropped: commands say it their own way (models.DEMO_NOTE)."""
    from clipcount.api import Counter
    from clipcount.models import DemoModelWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DemoModelWarning)
        return Counter.from_pretrained(args.model, device=device or args.device, precision=args.precision,
                                       stride=args.stride, windowing=getattr(args, "windowing", None),
                                       limits=limits or image_limits(args))


def _report_missing(missing: list[str], prompts: list[str], journal: "Journal") -> int:
    from clipcount.api import error_row

    for message in missing:
        print(f"clipcount: error: {message}", file=sys.stderr)
        image = message.split(": ", 1)[0]  # list_images names the input first
        journal.add([error_row(image, prompt, message) for prompt in prompts])
    return len(missing)


def format_line(row: dict[str, Any]) -> str:
    """image, prompt, count: tab-separated, so that both people and `cut` can read it."""
    count = row["count"]
    return f"{row['image']}\t{row['prompt']}\t{'nan' if count is None else f'{count:.2f}'}"


def _note(message: str, args: argparse.Namespace | None = None) -> None:
    """A line on stderr for people; with args, --quiet silences it."""
    if args is None or not getattr(args, "quiet", False):
        print(f"clipcount: {message}", file=sys.stderr)


# ---- which images are done ---------------------------------------------------------------------

def completed_images(rows: Iterable[dict[str, Any]], prompts: list[str]) -> set[str]:
    """Images with a successful row for every prompt: what --resume need not count again."""
    counted: dict[str, set[str]] = {}
    for row in rows:
        if not row.get("error") and row.get("count") is not None:
            counted.setdefault(str(row["image"]), set()).add(str(row["prompt"]))
    wanted = set(prompts)
    return {image for image, done in counted.items() if wanted <= done}


def _row_key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row.get("image")), str(row.get("prompt"))


# ---- outputs -----------------------------------------------------------------------------------

@dataclass
class Outputs:
    """Where results go: --json and/or --csv, each a file or stdout."""

    json: str | None
    csv: str | None

    journal_suffix: str = ""  # one journal per rank in a sharded run

    @classmethod
    def from_args(cls, args: argparse.Namespace, shard: Shard | None = None) -> "Outputs":
        from clipcount.errors import ConfigError

        sharded = shard is not None and shard.sharded
        outputs = cls(args.json, args.csv, f".rank{shard.rank}" if sharded else "")
        if sharded and outputs.primary_file() is None:
            raise ConfigError("a run over several processes merges its parts into a file: add --json FILE or --csv FILE")
        if outputs.json == STDOUT and outputs.csv == STDOUT:
            raise ConfigError("--json - and --csv - would both write to stdout; send one of them to a file")
        if outputs.json and outputs.csv and outputs.json != STDOUT and \
                Path(outputs.json).expanduser().resolve() == Path(outputs.csv).expanduser().resolve():
            raise ConfigError(f"--json and --csv name the same file {outputs.json}; give them different names")
        if args.resume and outputs.primary_file() is None:
            raise ConfigError("--resume needs an output file to resume from: add --json FILE or --csv FILE")
        if args.resume and getattr(args, "overwrite", False):
            raise ConfigError("--resume keeps what an earlier run counted and --overwrite discards it; choose one")
        from clipcount.imaging import check_writable

        for flag, name in (("--json", outputs.json), ("--csv", outputs.csv)):
            if name and name != STDOUT:
                check_writable(name, flag)
        if getattr(args, "overlay", None):
            check_writable(args.overlay, "--overlay", folder=True)
        return outputs

    @property
    def uses_stdout(self) -> bool:
        return STDOUT in (self.json, self.csv)

    def files(self) -> list[str]:
        return [name for name in (self.json, self.csv) if name and name != STDOUT]

    def primary_file(self) -> Path | None:
        files = self.files()
        return Path(files[0]).expanduser() if files else None

    def journal_path(self) -> Path | None:
        primary = self.primary_file()
        if primary is None:
            return None
        return primary.with_name(f".{primary.name}.clipcount-partial{self.journal_suffix}.jsonl")

    def check_no_saved_progress(self, overwrite: bool) -> None:
        """Refuse to start over an interrupted run's saved rows unless --overwrite says so."""
        from clipcount.errors import ConfigError

        journal = self.journal_path()
        if journal is None or not journal.is_file():
            return
        saved = {str(row["image"]) for row in read_journal(journal)}
        if saved and not overwrite:
            raise ConfigError(
                f"an interrupted run into {self.primary_file()} saved {len(saved)} counted image(s) in "
                f"{journal}; add --resume to continue it, or --overwrite to discard them and start over")

    def previous_rows(self) -> dict[tuple[str, str], dict[str, Any]]:
        """Rows of the previous complete outputs and of an interrupted run's journal, by (image, prompt).

        JSON rows (with points) win over CSV rows; the journal, being newer, wins over both.
        """
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        if self.csv and self.csv != STDOUT:
            merged.update((_row_key(row), row) for row in read_csv_rows(Path(self.csv).expanduser()))
        if self.json and self.json != STDOUT:
            merged.update((_row_key(row), row) for row in read_json_rows(Path(self.json).expanduser()))
        journal = self.journal_path()
        if journal is not None:
            merged.update((_row_key(row), row) for row in read_journal(journal))
        return merged

    def write(self, rows: list[dict[str, Any]], args: argparse.Namespace, prompts: list[str]) -> None:
        """Write every output in one step each (files atomically)."""
        from clipcount.engine.metrics import write_json_atomic

        document = json_document(rows, args.model, prompts)
        if self.json == STDOUT:
            json.dump(document, sys.stdout, indent=2, ensure_ascii=False)
            sys.stdout.write("\n")
        elif self.json:
            write_json_atomic(document, Path(self.json).expanduser())
        if self.csv == STDOUT:
            write_csv_stream(rows, sys.stdout)
        elif self.csv:
            from clipcount.engine.metrics import write_csv_atomic
            write_csv_atomic((csv_row(row) for row in rows), Path(self.csv).expanduser(), csv_fields())


def json_document(rows: list[dict[str, Any]], model: str, prompts: list[str]) -> dict[str, Any]:
    from clipcount import __version__

    return {"clipcount": __version__, "model": str(model), "prompts": prompts, "results": rows}


def csv_fields() -> list[str]:
    from clipcount.api import ROW_FIELDS

    return list(ROW_FIELDS)


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row for CSV: the table columns only, missing values empty."""
    return {name: ("" if row.get(name) is None else row.get(name)) for name in csv_fields()}


def write_csv_stream(rows: Iterable[dict[str, Any]], handle) -> None:
    writer = csv.DictWriter(handle, fieldnames=csv_fields(), lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_row(row) for row in rows)


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a previous --json output ([] if there is none); an unreadable one is an error."""
    from clipcount.errors import DataError

    if not path.is_file():
        return []
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        rows = document["results"] if isinstance(document, dict) else document
        return [dict(row) for row in rows if isinstance(row, dict) and "image" in row and "prompt" in row]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a clipcount JSON output ({error}); move it away or drop --resume") from None


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a previous --csv output ([] if there is none), counts back to numbers."""
    from clipcount.errors import DataError

    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"image", "prompt", "count"} <= set(reader.fieldnames):
            raise DataError(f"{path} is not a clipcount CSV output (needs image, prompt and count columns); "
                            "move it away or drop --resume")
        # A row with fewer fields than the header (None values), such as a last line cut short when
        # the file was copied or the disk filled, is not a result: dropped, so that its image is
        # counted again rather than kept as a junk row.
        return [_typed_csv_row(row) for row in reader if None not in row.values() and None not in row]


def _typed_csv_row(row: dict[str, str]) -> dict[str, Any]:
    typed: dict[str, Any] = dict(row)
    for name, kind in (("count", float), ("objects", int), ("width", int), ("height", int)):
        value = row.get(name)
        try:
            typed[name] = kind(value) if value not in (None, "") else None
        except ValueError:
            typed[name] = None
    typed["error"] = row.get("error") or ""
    return typed


# ---- the journal -------------------------------------------------------------------------------

class Journal:
    """Rows as JSON lines, appended and flushed one by one, so a killed run loses at most a line.

    Without an output file (stdout only) the rows are kept in memory instead.
    """

    def __init__(self, path: Path | None, carried: Iterable[dict[str, Any]] = ()):
        self.path = path
        self._memory: list[dict[str, Any]] = []
        self._handle = None
        if path is not None:
            self._handle = self._start(path, list(carried))
        else:
            self.add(list(carried))

    def _start(self, path: Path, carried: list[dict[str, Any]]):
        """A fresh journal holding the carried rows, swapped in atomically for any old one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(path.name + ".new")
        handle = temp.open("w", encoding="utf-8")
        self._handle = handle
        self.add(carried)
        os.replace(temp, path)  # the open handle keeps appending to the renamed file
        return handle

    def add(self, rows: list[dict[str, Any]]) -> None:
        if self._handle is None:
            self._memory.extend(rows)
            return
        for row in rows:
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()

    def rows(self) -> list[dict[str, Any]]:
        """Every row, one per (image, prompt): a later row replaces an earlier one in its place."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._memory = read_journal(self.path)
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self._memory:
            merged[_row_key(row)] = row
        return list(merged.values())

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Rows of a journal; a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "image" in row and "prompt" in row:
                rows.append(row)
    return rows


# ---- overlays ----------------------------------------------------------------------------------

def _overlay_names(paths: list[Path], prompts: list[str]) -> dict[str, dict[str, str]]:
    """image -> prompt -> file name, unique across the whole input list (also across --resume runs)."""
    used: set[str] = set()
    names: dict[str, dict[str, str]] = {}
    for path in paths:
        per_prompt = {}
        for prompt in prompts:
            base = f"{path.stem}.{_slug(prompt)}"
            name, number = f"{base}.png", 1
            while name in used:
                number += 1
                name = f"{base}-{number}.png"
            used.add(name)
            per_prompt[prompt] = name
        names[str(path)] = per_prompt
    return names


def _slug(text: str) -> str:
    """A prompt as a file-name part: letters, digits, - and _ only."""
    slug = "".join(char if char.isalnum() or char in "-_" else "_" for char in text.strip())
    return slug.strip("_")[:60] or "prompt"


def _write_overlays(item, folder: Path, names: dict[str, str]) -> None:
    from clipcount.imaging import save_image_atomic
    from clipcount.visualize import overlay

    for result in item.results:
        # drawn on the image as counted: points go from the file's pixel grid to the density's
        picture = overlay(item.image, result.density, result.points_on_density(), result.count, result.prompt)
        save_image_atomic(picture, folder / names[result.prompt])

