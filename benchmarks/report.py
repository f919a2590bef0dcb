"""The shared table and JSON output of every benchmark; it lives in the package (`clipcount.report`)
so the installed package's own benchmarks (the synthetic recipe's) can use it too."""

from clipcount.report import format_cell, print_table, write_json

__all__ = ["format_cell", "print_table", "write_json"]
