"""Several seeds of one experiment: the seed list, the mean ± std tables, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipcount.errors import ConfigError
from clipcount.experiments.seeds import aggregate_table, parse_seeds


def test_seed_lists_and_ranges():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5, 1, 4") == [3, 4, 5, 1]
    for bad in ("", "a", "1,,2"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def table(rows, example):
    """An "example" column that changes with the seed must not split rows."""
    rows = [{**row, "example": f"{example} {i}"} for i, row in enumerate(rows)]
    return {"title": "errors", "columns": ["variant", "example", "set", "n", "MAE"], "rows": rows, "note": ""}


def test_rows_are_matched_by_their_text_and_averaged():
    first = table([{"variant": "a", "set": "seen", "n": 10, "MAE": 1.0},
                   {"variant": "b", "set": "seen", "n": 10, "MAE": 4.0}], "red circles")
    second = table([{"variant": "b", "set": "seen", "n": 10, "MAE": 6.0},
                    {"variant": "a", "set": "seen", "n": 10, "MAE": 3.0},
                    {"variant": "c", "set": "seen", "n": 10, "MAE": float("nan")}], "blue stars")
    merged = aggregate_table([first, second], [0, 7])
    rows = {r["variant"]: r for r in merged["rows"]}
    assert rows["a"]["MAE"]["mean"] == pytest.approx(2.0)
    assert rows["a"]["MAE"]["std"] == pytest.approx(2 ** 0.5)  # sample standard deviation
    assert rows["a"]["MAE"]["values"] == {"0": 1.0, "7": 3.0}
    assert rows["b"]["MAE"]["mean"] == pytest.approx(5.0) and rows["a"]["n"]["std"] == 0.0
    assert rows["c"]["seeds"] == [7] and "MAE" not in rows["c"]  # a row of one seed; NaN is no number
    assert merged["columns"][-1] == "seeds" and len(merged["rows"]) == 3
    assert rows["a"]["example"] == "red circles 0"  # the first seed's example


def test_the_command_runs_seeds_and_writes_the_summary(tmp_path: Path, capsys):
    from clipcount.cli import main

    out = tmp_path / "spec"
    args = ["experiments", "specificity", "--out", str(out), "--budget", "toy", "--seeds", "0,1", "--no-progress"]
    assert main(args) == 0
    for seed in (0, 1):
        seed_results = json.loads((out / f"seed-{seed}" / "results.json").read_text(encoding="utf-8"))
        assert seed_results["run"]["seed"] == seed
    summary = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert summary["seeds"] == [0, 1] and set(summary["findings"]) == {"0", "1"}
    cell = summary["tables"][0]["rows"][0]["MAE"]
    assert set(cell["values"]) == {"0", "1"}
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "2 seeds" in text and " ± " in text and "seed-1/report.md" in text
    assert (tmp_path / ".clipcount-experiments-cache").is_dir()  # where a single run with this --out caches
    # a second call reuses the finished seed runs
    assert main(args) == 0
    assert "using the finished run" in capsys.readouterr().out


def test_rows_told_apart_by_a_number_stay_apart():
    """A stride sweep: one variant, one row per stride; strides are labels, not averaged."""
    sweep = [{"title": "sweep", "columns": ["variant", "stride", "MAE"], "note": "",
              "rows": [{"variant": "paper", "stride": stride, "MAE": stride / 10 + seed}
                       for stride in (128, 64, 32)]} for seed in (0, 1)]
    merged = aggregate_table(sweep, [0, 1])
    assert [r["stride"] for r in merged["rows"]] == [128, 64, 32]
    assert merged["rows"][0]["MAE"]["mean"] == pytest.approx(12.8 + 0.5)
