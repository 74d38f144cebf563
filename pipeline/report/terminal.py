"""The report's accuracy table on a terminal (rich): every method row and every split's
accuracy with its ≈ mark, each row on one line of the terminal's width. Columns that do not fit
beside each other go to further tables that repeat the method column; 95 % intervals are shown
where they fit without needing another table. report.md keeps the full markdown table, and a
pipe or a log file gets that markdown (pipeline/cli.py)."""
from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from .results import table_cells

MARK = " ≈"
NO_MARK = "  "  # keeps the numbers of a column aligned whether or not a row is marked


def _header(role: str, name: str) -> str:
    if role == "ood":
        return name
    return role if name in ("", role) else f"{role}\n{name}"


def _cell(cell: tuple, interval: bool, marks: bool):
    from rich.text import Text

    acc, bounds, mark = cell
    if acc is None:
        return Text("–" + (NO_MARK if marks else ""))
    text = Text(f"{100 * acc:.1f}")
    if interval and bounds is not None:
        text.append(f" [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]", style="dim")
    if marks:
        text.append(MARK if mark else NO_MARK)
    return text


def build_table(columns: Sequence[tuple[str, str]], rows: Sequence[tuple[str, list]], shown: Sequence[int],
                intervals: set[int]):
    """A rich table of the method column and the data columns ``shown``, with intervals in the
    columns ``intervals``; no cell ever wraps."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("method", no_wrap=True)
    marks = {i: any(cells[i][2] for _, cells in rows) for i in shown}
    for i in shown:
        table.add_column(_header(*columns[i]), justify="right", no_wrap=True)
    for name, cells in rows:
        table.add_row(Text(name), *(_cell(cells[i], i in intervals, marks[i]) for i in shown))
    return table


GAP = 3  # cells between two columns of a box.SIMPLE_HEAD table: padding, divider, padding


def _width(texts) -> int:
    from rich.cells import cell_len

    return max(cell_len(line) for text in texts for line in str(text).split("\n"))


def layout(columns: Sequence[tuple[str, str]], rows: Sequence[tuple[str, list]],
           width: int) -> tuple[list[list[int]], set[int]]:
    """(the data columns of each table, the columns shown with intervals): the fewest tables
    of bare numbers that fit ``width`` (columns in order, each table as full as it goes), then
    intervals added column by column (id_test, ood avg, the ood sets, val) wherever that needs
    no further table. A column wider than the terminal on its own still gets a table."""
    marks = [any(cells[i][2] for _, cells in rows) for i in range(len(columns))]
    method = _width(["method", *(name for name, _ in rows)])
    widths = {(i, interval): _width([_header(*columns[i]),
                                     *(_cell(cells[i], interval, marks[i]) for _, cells in rows)])
              for i in range(len(columns)) for interval in (False, True)}

    def pack(intervals: set[int]) -> list[list[int]]:
        tables: list[list[int]] = [[]]
        used = method
        for i in range(len(columns)):
            need = GAP + widths[i, i in intervals]
            if tables[-1] and used + need > width:
                tables.append([])
                used = method
            tables[-1].append(i)
            used += need
        return tables

    n = len(columns)
    fewest = len(pack(set()))
    intervals: set[int] = set()
    for i in [1, n - 1, *range(2, n - 1), 0]:
        if len(pack(intervals | {i})) <= fewest:
            intervals |= {i}
    return pack(intervals), intervals


def print_table(report: Mapping, file: TextIO | None = None, width: int | None = None) -> None:
    """The accuracy table as one or more rich tables fitting the terminal (or ``width``), then
    one line saying what the numbers and marks mean."""
    from rich.console import Console

    console = Console(file=file or sys.stdout, width=width, highlight=False)
    columns, rows = table_cells(report)
    tables, intervals = layout(columns, rows, console.width)
    for k, shown in enumerate(tables):
        if k:
            console.print()
        console.print(build_table(columns, rows, shown, intervals))
    notes = ["top-1 accuracy in %"]
    if intervals:
        notes.append("[95 % interval]" + ("" if len(intervals) == len(columns) else " where it fits (all in report.md)"))
    if any(cell[2] for _, cells in rows for cell in cells):
        mcnemar = report.get("mcnemar", {})
        notes.append(f"≈: not told apart from {mcnemar.get('reference', 'mmms')} "
                     f"(exact McNemar, p ≥ {mcnemar.get('alpha', 0.05):g})")
    console.print("; ".join(notes), markup=False, highlight=False)
