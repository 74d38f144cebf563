"""What a user sees at a terminal, read from a real pseudo-terminal of a fixed size after
terminal emulation (pyte): lines printed while a progress bar is open stand whole above it,
every bar ends at its real total, and the final table fits the terminal's width."""
from __future__ import annotations

import io
import os
import random
import re
import sys
from pathlib import Path

import pytest

from conftest import EVALUATED_OVERRIDES, TINY_OVERRIDES, clone_output
from terminal_screen import BAR, occurrences, run_in_terminal

pytest.importorskip("pyte")

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def child_env() -> dict:
    """This process's environment, with this checkout first on the child's import path."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([path] if path else [])])}


def bar_lines(screen: list[str]) -> list[str]:
    return [line for line in screen if BAR.search(line)]


def assert_bars_closed_at_their_totals(screen: list[str], stage: str) -> None:
    for line in bar_lines(screen):
        done, total = map(int, re.search(r"(\d+)/(\d+)", line).groups())
        assert done == total, f"a bar left short of its total: {line!r}"
        assert "%|" not in line or "100%|" in line, line
        assert f"{stage}: " not in line.split("|")[-1] and not line.startswith(f"{stage}: "), \
            f"a bar and a stage line share a screen line: {line!r}"


def stage_messages(raw: str, stage: str) -> list[str]:
    """The stage's lines as the program wrote them (bars, drawn with the stage's label, left out)."""
    text = ANSI.sub("", raw)
    found = [m.rstrip() for m in re.findall(rf"{stage}: [^\r\n]*", text)]
    return [m for m in found if not BAR.search(m) and not re.match(rf"{stage}:\s+\d+%\|", m)]


# ---- every writer while a bar is open ----------------------------------------------------------

def test_lines_written_while_a_bar_is_open_stand_whole_above_it():
    columns = 80
    rc, screen, raw = run_in_terminal([sys.executable, str(ROOT / "tests" / "terminal_writers.py")], columns,
                                      lines=60, env=child_env(), timeout=120)
    assert rc == 0, "\n".join(screen)
    shown = "\n".join(screen)
    for line in ["writers: a stage line on stdout", "WARNING pipeline.writers: a logged warning",
                 "(pid=4242) a line a worker printed", "writers: a partial line ended later", "writers: done"]:
        assert occurrences(screen, line, columns) == 1, f"{line!r} not once on its own line:\n{shown}"
    assert sum(line.endswith("UserWarning: a python warning") for line in screen) == 1, shown
    bars = bar_lines(screen)
    assert [b.split(":")[0] for b in bars] == ["writers phase 1", "writers phase 2"], shown
    assert bars[0].rstrip("]").endswith("stopped early: 20 evaluations not needed") and "30/30" in bars[0], shown
    assert "7/7" in bars[1], shown
    assert_bars_closed_at_their_totals(screen, "writers")
    # the first bar was open while the lines were printed: it stands below all of them
    assert screen.index(bars[0]) == len(screen) - 3 and screen[-1] == "writers: done", shown


# ---- the final table ---------------------------------------------------------------------------

def header_columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())[1:]  # past "method"


CELL = re.compile(r"(\d+\.\d|–)(?: \[\d+\.\d, \d+\.\d\])?( ≈)?")


def tables_on_screen(screen: list[str], methods: list[str]) -> list[tuple[list[str], dict[str, str]]]:
    """[(column names, {method: its row})] of each table on the screen; a line inside a table
    that is neither its header, its rule nor a method's row (a row that wrapped) fails."""
    tables = []
    for i, line in enumerate(screen):
        if not re.match(r"method\s", line):
            continue
        assert set(screen[i + 1].strip()) == {"─"}, screen[i + 1]
        rows = screen[i + 2:i + 2 + len(methods)]
        assert [r.split()[0] if r.strip() else "" for r in rows] == methods, \
            "table rows not one line each:\n" + "\n".join(screen[i:i + 2 + len(methods) + 1])
        after = screen[i + 2 + len(methods)] if i + 2 + len(methods) < len(screen) else ""
        assert not after.startswith(" "), f"a row continues on the next line: {after!r}"
        tables.append((header_columns(line), dict(zip(methods, rows))))
    return tables


def assert_table_fits(screen: list[str], report: dict, columns: int) -> int:
    """Every method's row and every split's accuracy (and ≈ mark) are on the screen, each row on
    one line; returns the number of tables."""
    from pipeline.report.results import table_cells

    names, rows = table_cells(report)
    methods = [name for name, _ in rows]
    expected = {name: cells for name, cells in rows}
    tables = tables_on_screen(screen, methods)
    heads = {("ood avg" if role == "ood avg" else name): k for k, (role, name) in enumerate(names)}
    seen = []
    for head, row_of in tables:
        seen += head
        for method, row in row_of.items():
            assert len(row) <= columns
            cells = CELL.findall(row[len(method):])
            assert len(cells) == len(head), row
            for column, (number, mark) in zip(head, cells):
                acc, _, significant = expected[method][heads[column]]
                assert number == f"{100 * acc:.1f}" and bool(mark) == significant, (method, column, row)
    assert sorted(seen) == sorted(heads), (seen, list(heads))
    return len(tables)


def synthetic_report(methods: list[str], ood: list[str], seed: int = 0) -> dict:
    """A report.json's table part with made-up numbers and tests."""
    rng = random.Random(seed)
    sizes = {"val": 323, "id_test": 540, **{o: 540 for o in ood}}
    rows = {}
    for m in methods:
        accs = {s: rng.uniform(0.05, 0.999) for s in ood}
        rows[m] = {"val": rng.uniform(0.8, 0.99), "id_test": rng.uniform(0.8, 0.99), "ood": accs,
                   "ood_avg": sum(accs.values()) / len(accs)}
    tests = {m: {s: {"p": rng.choice([0.001, 0.4])} for s in ["id_test", *ood]} for m in methods if m != "mmms"}
    return {"methods": rows, "splits": {"val": "val", "id_test": "id_test", "ood": ood}, "split_sizes": sizes,
            "mcnemar": {"reference": "mmms", "alpha": 0.05, "tests": tests}}


@pytest.mark.parametrize("columns", [80, 100, 160])
def test_the_table_fits_any_number_of_methods_and_sets(columns):
    from pipeline.report.terminal import print_table

    methods = ["zero_shot", "best_individual", "uniform_soup", "greedy_soup", "wise_ft", "output_ensemble",
               "model_stock", "lines", *(f"extra_method_{k}" for k in range(6)), "mmms_phase1", "mmms"]
    for ood in (["noise", "blur", "rotate", "invert", "sketch"],
                ["imagenet-v2", "imagenet-r", "imagenet-sketch", "objectnet", "imagenet-a", "shift-6", "shift-7"]):
        report = synthetic_report(methods, ood)
        out = io.StringIO()
        print_table(report, file=out, width=columns)
        screen = out.getvalue().splitlines()
        assert all(len(line) <= columns for line in screen)
        n = assert_table_fits(screen, report, columns)
        assert n >= 2 if columns == 80 else n >= 1


# ---- a small soup in a terminal ------------------------------------------------------------------

@pytest.fixture(scope="module")
def soup_in_terminals(evaluated_demo, tmp_path_factory):
    """`frankensoup soup` on a copy of the evaluated demo in an 80-column terminal, then again
    (every input unchanged: the published report is reused) in a 100-column one."""
    out = tmp_path_factory.mktemp("terminal") / "out"
    cfg = clone_output(evaluated_demo, out, *EVALUATED_OVERRIDES)
    sets = [arg for o in [*TINY_OVERRIDES, *EVALUATED_OVERRIDES, f"output_uri={out}"] for arg in ("--set", o)]
    command = [sys.executable, "-m", "pipeline", "soup", *sets]
    first = run_in_terminal(command, 80, env=child_env(), timeout=900)
    second = run_in_terminal(command, 100, env=child_env(), timeout=600) if first[0] == 0 else (None, [], "")
    return cfg, first, second


def test_a_soup_in_a_terminal_shows_whole_lines_closed_bars_and_a_table_that_fits(soup_in_terminals):
    from pipeline.soup.publish import read_report

    cfg, (rc, screen, raw), (rc2, screen2, raw2) = soup_in_terminals
    shown = "\n".join(screen)
    assert rc == 0, shown
    assert rc2 == 0, "\n".join(screen2)
    report = read_report(cfg)  # the run soup/LATEST names
    # a bar for each phase of the search, each closed at its real total, none sharing a line
    phases = {re.match(r"soup phase (\d)", line).group(1) for line in bar_lines(screen)}
    assert phases == ({"1", "2"} if cfg.soup.phase2.enabled else {"1"}), shown
    assert_bars_closed_at_their_totals(screen, "soup")
    # every stage line once, whole, on its own lines
    messages = stage_messages(raw, "soup")
    assert any("mixtures from memo" in m for m in messages) and any(m.startswith("soup: published") for m in messages)
    for message in messages:
        assert occurrences(screen, message, 80) == 1, f"{message!r} not once on its own lines:\n{shown}"
    # the table, last, fits: two tables at 80 columns repeating the method column, and at 100
    assert assert_table_fits(screen, report, 80) == 2, shown
    assert assert_table_fits(screen2, report, 100) >= 1, "\n".join(screen2)
    assert not bar_lines(screen2) and stage_messages(raw2, "soup")[0].startswith("soup: inputs unchanged")


def test_a_pipe_or_quiet_gets_the_markdown_table(capsys, monkeypatch):
    from types import SimpleNamespace

    from pipeline.cli import _final_table
    from pipeline.report.results import markdown_table

    report = synthetic_report(["zero_shot", "best_individual", "mmms_phase1", "mmms"], ["noise", "blur"])
    _final_table(SimpleNamespace(quiet=False), report)  # captured stdout: not a terminal
    assert capsys.readouterr().out == markdown_table(report) + "\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setenv("COLUMNS", "80")  # rich's width where the stream has none
    _final_table(SimpleNamespace(quiet=True), report)
    assert sys.stdout.getvalue() == markdown_table(report) + "\n"
    sys.stdout = Terminal()
    _final_table(SimpleNamespace(quiet=False), report)  # a terminal: the tables that fit it
    shown = sys.stdout.getvalue()
    assert "| mmms |" not in shown and assert_table_fits(ANSI.sub("", shown).splitlines(), report, 80) >= 1
