"""One experiment over several seeds: each seed's full report, then their tables as mean ± std.

At the small budget a comparison can flip sign from one seed to the next (measured: the contrastive
stage was 55% worse at seed 0 and 22% better at seed 1), so a single run cannot carry a claim.

    OUT/seed-S/           each seed's report.md, results.json and plots (run_experiment)
    OUT/report.md         every table of the seed runs, numbers as mean ± std over the seeds, and
                          each seed's findings
    OUT/results.json      the same: per cell the mean, std and the value of every seed

Rows are matched across seeds by their text cells that recur from seed to seed (variant, set,
...; an example prompt that changes with the seed is shown as the first seed's), and by number
cells where text alone repeats within a table (a stride sweep); a row missing from some seed is
aggregated over the seeds that have it, and says so in its "seeds" column.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

from clipcount.errors import ConfigError
from clipcount.experiments.common import REPORT_FILE, RESULTS_FILE, Table, format_cell

SEED_FOLDER = "seed-{}"


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' -> seeds, in order, without repeats."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            span = range(int(low), int(high) + 1) if high else [int(low)]
            seeds += [s for s in span if s not in seeds]
    except ValueError:
        raise ConfigError(f"--seeds takes numbers like 0,1,2 or 0-4, not {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds needs at least one seed")
    return seeds


def run_seeds(run_one: Callable[[int, Path], Path], out: Path, seeds: Sequence[int], log=print) -> Path:
    """Run `run_one(seed, folder)` (-> that run's report.md) for every seed into OUT/seed-S, then
    write the aggregate report; returns its path. A seed whose results.json exists is not rerun."""
    out = Path(out)
    results = []
    for seed in seeds:
        folder = out / SEED_FOLDER.format(seed)
        if not (folder / RESULTS_FILE).is_file():
            run_one(seed, folder)
        else:
            log(f"seed {seed}: using the finished run in {folder}")
        results.append(json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8")))
    return write_summary(out, list(seeds), results)


# ---- aggregation ----------------------------------------------------------------------------------

def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_text(value: Any) -> bool:
    return isinstance(value, (str, bool))


def label_columns(tables: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """The text columns that name rows: those whose values mostly recur from seed to seed (a
    "variant" or "set" column), not those that change with the seed (an "example" prompt)."""
    labels = []
    for column in columns:
        values = [{str(r[column]) for r in t["rows"] if is_text(r.get(column))} for t in tables]
        if not values[0]:
            continue
        if all(len(values[0] & v) >= 0.5 * len(values[0] | v) for v in values[1:]):
            labels.append(column)
    return labels


def with_numeric_labels(tables: Sequence[dict[str, Any]], columns: Sequence[str], labels: list[str]) -> list[str]:
    """Add number columns to the labels, in column order, while some table has two rows with the same
    label (a stride sweep: one variant, rows told apart by their "stride")."""
    def unique(chosen: list[str]) -> bool:
        return all(len({row_key(r, chosen) for r in t["rows"]}) == len(t["rows"]) for t in tables)

    for column in columns:
        if unique(labels):
            break
        if column not in labels:
            labels = labels + [column]
    return [c for c in columns if c in labels]


def row_key(row: dict[str, Any], labels: Sequence[str]) -> tuple:
    return tuple((c, row.get(c)) for c in labels)


def aggregate_table(tables: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """The same table from several seeds -> one table: per numeric cell mean, std and values."""
    columns = list(tables[0]["columns"])
    labels = with_numeric_labels(tables, columns, label_columns(tables, columns))
    order: list[tuple] = []
    cells: dict[tuple, dict[str, dict[int, float]]] = {}
    present: dict[tuple, list[int]] = {}
    texts: dict[tuple, dict[str, Any]] = {}
    for seed, table in zip(seeds, tables):
        for row in table["rows"]:
            key = row_key(row, labels)
            if key not in cells:
                order.append(key)
                cells[key], present[key] = {}, []
                texts[key] = {c: row[c] for c in columns if is_text(row.get(c)) or c in labels}  # first seed's
            present[key].append(seed)
            for column in columns:
                if column not in labels and is_number(row.get(column)):
                    cells[key].setdefault(column, {})[seed] = float(row[column])
    rows = []
    for key in order:
        row: dict[str, Any] = dict(texts[key])
        for column, values in cells[key].items():
            numbers = list(values.values())
            std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0  # sample standard deviation
            row[column] = {"mean": statistics.fmean(numbers), "std": std,
                           "values": {str(s): v for s, v in values.items()}}
        row["seeds"] = present[key]
        rows.append(row)
    return {"title": tables[0]["title"], "columns": columns + ["seeds"], "rows": rows, "note": tables[0].get("note", "")}


def format_summary_cell(value: Any, all_seeds: Sequence[int]) -> str:
    if isinstance(value, dict) and "mean" in value:
        if value["std"] <= 1e-9 * max(1.0, abs(value["mean"])):  # the same every seed (up to rounding)
            return format_cell(value["mean"])
        return f"{format_cell(value['mean'])} ± {format_cell(value['std'])}"
    if isinstance(value, list):  # the seeds that have the row
        return "all" if list(value) == list(all_seeds) else ", ".join(map(str, value))
    return format_cell(value)


def summary_markdown(results: Sequence[dict[str, Any]], seeds: Sequence[int], tables: list[dict[str, Any]]) -> str:
    first = results[0]
    lines = [f"# {first['title']}: {len(seeds)} seeds", "",
             f"`clipcount experiments {first['experiment']}`, budget **{first['run']['budget']['name']}**, "
             f"seeds {', '.join(map(str, seeds))}; each seed's own report is in `{SEED_FOLDER.format('S')}/`. "
             "Numbers are mean ± standard deviation over the seeds (training, CLIP pretraining and test "
             "scenes all change with the seed).", "", "## Question", "", first["question"], "",
             "## Findings, seed by seed", ""]
    for seed, result in zip(seeds, results):
        lines += [f"Seed {seed}:", ""] + [f"- {f}" for f in result["findings"]] + [""]
    lines += ["## Tables over the seeds", ""]
    for table in tables:  # cells formatted here, laid out by the single-run report's Table
        rows = [{c: format_summary_cell(row.get(c), seeds) for c in table["columns"]} for row in table["rows"]]
        lines += [Table(table["title"], table["columns"], rows, table.get("note", "")).markdown(), ""]
    seconds = sum(float(r["run"].get("seconds", 0) or 0) for r in results)
    lines += ["## Runs", "", f"- {len(seeds)} runs, {seconds:.0f} s in all (models trained by an earlier run "
              "are reused from the cache and not counted again)"]
    lines += [f"- seed {s}: `{SEED_FOLDER.format(s)}/{REPORT_FILE}`" for s in seeds]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, seeds: Sequence[int], results: Sequence[dict[str, Any]]) -> Path:
    """OUT/report.md and OUT/results.json over the seed runs; returns the report's path."""
    from clipcount.engine.metrics import write_json_atomic
    from clipcount.imaging import atomic_write

    titles = [t["title"] for t in results[0]["tables"]]
    tables = []
    for title in titles:
        same = [next((t for t in r["tables"] if t["title"] == title), None) for r in results]
        have = [(s, t) for s, t in zip(seeds, same) if t is not None]
        tables.append(aggregate_table([t for _, t in have], [s for s, _ in have]))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / REPORT_FILE, "w", encoding="utf-8") as handle:
        handle.write(summary_markdown(results, seeds, tables))
    payload = {"experiment": results[0]["experiment"], "title": results[0]["title"], "seeds": list(seeds),
               "findings": {str(s): r["findings"] for s, r in zip(seeds, results)}, "tables": tables,
               "runs": {str(s): SEED_FOLDER.format(s) for s in seeds}}
    write_json_atomic(payload, out / RESULTS_FILE)
    return out / REPORT_FILE
