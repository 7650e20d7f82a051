"""The one table formatter: rows of dicts → a fixed-width table for the terminal, or Markdown for docs.

A column is ``(key, header, spec)``: ``spec`` is a format spec applied to ``row[key]`` (".1f", ",", "") or
a function of the whole row returning the cell text. A missing key or a None value prints "-".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Column = tuple[str, str, "str | Callable[[dict[str, Any]], str]"]


def _cell(row: dict[str, Any], key: str, spec: str | Callable[[dict[str, Any]], str]) -> str:
    if callable(spec):
        return spec(row)
    value = row.get(key)
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def percent(key: str, digits: int = 1) -> Callable[[dict[str, Any]], str]:
    """A cell showing a fraction in [0, 1] as a percentage ("-" when missing)."""
    return lambda row: "-" if row.get(key) is None else f"{100 * row[key]:.{digits}f}"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], markdown: bool = False) -> str:
    """The rows as a table: first column left-aligned, the others right-aligned (Markdown: ``| a | b |``)."""
    headers = [header for _, header, _ in columns]
    cells = [[_cell(row, key, spec) for key, _, spec in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return " ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    head = line(headers)
    return "\n".join([head, "-" * len(head)] + [line(r) for r in cells])
