"""What the command line shows: --version, -q, Ray Data's console logging, no false
"initialized randomly" warning for the models we create without weights on purpose, and
progress as a bar on a terminal or status lines with rate and ETA elsewhere."""
from __future__ import annotations

import io
import logging
import os

import pytest
import yaml

from pipeline import console
from pipeline.cli import main


@pytest.fixture
def restore_console(monkeypatch):
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    yield
    console.configure(console.NORMAL)
    os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"frankensoup {version('frankensoup')}"


def test_quiet_prints_nothing_but_errors(tmp_path, capsys, restore_console):
    from PIL import Image

    (tmp_path / "src" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "src" / "cat" / "a.png")
    assert main(["-q", "import-images", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--serial"]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["import-images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2"), "--serial", "-q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("frankensoup: error: image folder") and "nowhere" in err


def test_verbosity_sets_ray_and_ray_data_logging(restore_console):
    console.configure(console.NORMAL)
    with open(os.environ["RAY_DATA_LOGGING_CONFIG"]) as f:
        config = yaml.safe_load(f)
    assert config["handlers"]["console"]["level"] == "WARNING"
    assert config["handlers"]["file"]["filename"] == "ray-data.log"  # Ray Data's own log file stays
    assert console.ray_init_kwargs() == {"logging_level": logging.WARNING, "log_to_driver": True}
    console.configure(console.QUIET)
    with open(os.environ["RAY_DATA_LOGGING_CONFIG"]) as f:
        assert yaml.safe_load(f)["handlers"]["console"]["level"] == "ERROR"
    assert console.ray_init_kwargs() == {"logging_level": logging.ERROR, "log_to_driver": False}
    console.configure(console.VERBOSE)
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ
    assert console.ray_init_kwargs()["logging_level"] == logging.INFO
    # the notice Ray Data logs because its bars are off is dropped; its other warnings are not
    noise = console.RayDataNoise()
    record = logging.LogRecord("ray.data", logging.WARNING, "x", 1, "Progress bars disabled. To enable, ...", None, None)
    other = logging.LogRecord("ray.data", logging.WARNING, "x", 1, "object store is small", None, None)
    assert not noise.filter(record) and noise.filter(other)


def test_creating_a_model_without_weights_does_not_warn(caplog, restore_console):
    import open_clip

    from pipeline.model import factory

    root = logging.getLogger()
    for f in [f for f in root.filters if isinstance(f, console.RandomInitNoise)]:
        root.removeFilter(f)  # as before any `frankensoup` command ran in this process
    caplog.set_level(logging.WARNING)
    open_clip.create_model(factory.DEMO_MODEL, pretrained=None)
    assert any("initialized randomly" in r.getMessage() for r in caplog.records)  # open_clip says it
    caplog.clear()
    console.configure(console.NORMAL)
    open_clip.create_model(factory.DEMO_MODEL, pretrained=None)
    logging.warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["another warning"]


# ---- progress: a bar on a terminal, status lines with rate and ETA elsewhere ----------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_status_lines_come_at_the_configured_interval_with_rate_and_eta(restore_console):
    from pipeline.config import load_config

    every = load_config(None, ["console.status_every_s=5"]).console.status_every_s
    clock, lines = FakeClock(), []
    progress = console.Progress(1000, "evaluate", "image", every_s=every, stream=io.StringIO(), log=lines.append,
                                clock=clock)
    assert progress.bar is None
    for step in range(1, 11):
        clock.now += 2
        progress.update(100 * step)
    progress.close()
    # every 5 s of the fake clock (t = 6, 12, 18), and the end
    assert lines == ["evaluate: 300 of 1,000 images (30.0%) | 50.0 images/s | ETA 14s",
                     "evaluate: 600 of 1,000 images (60.0%) | 50.0 images/s | ETA 8s",
                     "evaluate: 900 of 1,000 images (90.0%) | 50.0 images/s | ETA 2s",
                     "evaluate: 1,000 of 1,000 images (100.0%) | 50.0 images/s | ETA 0s"]


def test_slow_work_says_seconds_per_unit_and_its_own_text(restore_console):
    clock, lines = FakeClock(), []
    progress = console.Progress(8, "finetune", "trial", bar=False, log=lines.append, clock=clock)
    clock.now += 150
    progress.update(2, text="ft-001 finished (2/8)", force=True)
    progress.update(3, best_val=0.5)  # not forced, interval not reached: no line
    assert lines == ["finetune: ft-001 finished (2/8) | 75.0 s/trial | ETA 7m30s"]


def test_a_first_line_at_the_start_claims_no_rate(restore_console):
    clock, lines = FakeClock(), []
    progress = console.Progress(500, "soup", "evaluation", bar=False, log=lines.append, clock=clock)
    clock.now += 1e-5  # the first batch answered from the memo, next to no time after the start
    progress.update(1, force=True)
    clock.now += 10
    progress.update(101, force=True)
    assert lines == ["soup: 1 of 500 evaluations (0.2%) | ETA ?",
                     "soup: 101 of 500 evaluations (20.2%) | 10.1 evaluations/s | ETA 40s"]


def test_a_terminal_gets_a_tqdm_bar_and_no_lines(restore_console):
    from tqdm import tqdm

    stream, lines = Terminal(), []
    progress = console.Progress(200, "evaluate", "image", stream=stream, log=lines.append)
    assert isinstance(progress.bar, tqdm)
    progress.update(50, best_val=0.9)
    progress.update(120, total=240)
    progress.close()
    out = stream.getvalue()
    assert "image/s" in out and "best_val=0.9000" in out and lines == []
    # the work ended: the bar closes at what was done (120 of an expected 240), not at the estimate
    assert out.rstrip("\n").rsplit("\r", 1)[-1].startswith("evaluate: 100%|") and "120/120" in out
    stream = Terminal()
    progress = console.Progress(200, "evaluate", "image", stream=stream)
    progress.update(120)
    progress.close(finished=False)  # a failure: the bar stays where the work stopped
    assert "120/200" in stream.getvalue() and "120/120" not in stream.getvalue()


def test_quiet_shows_no_progress(restore_console):
    console.configure(console.QUIET)
    lines, terminal = [], Terminal()
    for stream in (terminal, io.StringIO()):
        progress = console.Progress(10, "evaluate", "image", stream=stream, log=lines.append, every_s=0)
        assert progress.bar is None
        progress.update(5, force=True)
        progress.update(10)
        progress.close()
    assert lines == [] and terminal.getvalue() == ""


def soup_progress(phase: int, ingredient: int | None, evals: int, expected: float) -> dict:
    return {"phase": phase, "ingredient": ingredient, "step": "pass 1", "evals": evals, "budget": 3158,
            "expected": expected, "dropped": 0, "best_val": 0.5 + evals / 10_000, "batch": 1, "seconds": 0.1}


def test_the_soup_search_prints_a_line_per_phase_and_per_interval(restore_console):
    from pipeline.soup.progress import ProgressPrinter

    clock, lines = FakeClock(), []
    printer = ProgressPrinter(["ft-000", "ft-001"], lines.append, every_s=10, stream=io.StringIO(), clock=clock)
    printer(soup_progress(1, 0, 1, 900))
    for evals in range(2, 31):  # one evaluation a second
        clock.now += 1
        printer(soup_progress(1, evals % 2, evals, 900))
    printer(soup_progress(2, None, 1, 400))  # a new phase: a line at once, its own rate
    printer.close()
    # phase 1 at its start, after 10 s and after 20 s; phase 2 at its start
    assert [line.split(" | ")[0] for line in lines] == ["soup: phase 1"] * 3 + ["soup: phase 2"]
    assert lines[2] == ("soup: phase 1 | ingredient ft-001 (pass 1) | evaluations 21 of ~900 expected "
                        "(at most 3158) | best val 0.5021 | 1.1 evaluations/s | ETA 13m57s")
    assert lines[-1].endswith("| best val 0.5001 | ETA ?")


def test_the_soup_search_on_a_terminal_is_a_bar_per_phase(restore_console):
    from pipeline.soup.progress import ProgressPrinter

    stream, lines = Terminal(), []
    printer = ProgressPrinter(["ft-000", "ft-001"], lines.append, stream=stream)
    printer(soup_progress(1, 1, 458, 1210.4))
    shown = str(printer._progress.bar)  # tqdm draws at most every 0.1 s: what the bar reads now
    assert shown.startswith("soup phase 1 ft-001:") and "458/1211" in shown and "best_val=" in shown
    printer(soup_progress(2, None, 3, 400))
    assert str(printer._progress.bar).startswith("soup phase 2 all chosen:")
    printer.close()
    out = stream.getvalue()
    assert lines == []
    # phase 1 ended early: its bar closed at the evaluations it made, saying how many it spared
    assert "soup phase 1: 100%|" in out and "458/458" in out
    assert "stopped early: 753 evaluations not needed" in out


def test_a_finished_trial_says_the_eta_of_the_rest(capsys, restore_console):
    from types import SimpleNamespace

    from pipeline.finetune.sweep import TrialLog

    log = TrialLog({0: "ft-000", 1: "ft-001"}, 2)
    log.setup()
    log.on_trial_complete(0, [], SimpleNamespace(config={"trial": 1}, trial_id="abc_00001",
                                                 last_result={"val_acc": 0.95981, "epoch": 4}))
    line = capsys.readouterr().out.strip()
    assert line.startswith("finetune: ft-001 finished (1/2; Tune trial abc_00001): val_acc 0.9598 after 4 epochs | ")
    assert "| ETA " in line


def test_evaluate_progress_ends_each_scoring_pass_with_a_line(restore_console, monkeypatch):
    from pipeline.evaluate.stage import progress_printer

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    lines = []
    progress = progress_printer(lines.append, every_s=3600)
    for done, total in [(40, 100), (100, 100), (5, 20), (20, 20)]:  # two passes (two groups of splits)
        progress(done, total)
    assert [line.split(" | ")[0] for line in lines] == ["evaluate: 100 of 100 images (100.0%)",
                                                        "evaluate: 20 of 20 images (100.0%)"]
    assert all(line.endswith("ETA 0s") for line in lines)


def test_a_worker_hides_an_exit_raised_during_cleanup_and_reports_any_other(tmp_path):
    """In a Ray worker, a SystemExit raised while a weakref callback runs (how Ray's actor exit
    can land) is not printed as an ignored exception; any other ignored exception still is."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(
        "import weakref\n"
        "from pipeline import console\n"
        "console.quiet_worker_logs()\n"
        "class Thing: pass\n"
        "def raising(exc):\n"
        "    def callback(_ref):\n"
        "        raise exc\n"
        "    return callback\n"
        "a, b = Thing(), Thing()\n"
        "refs = [weakref.ref(a, raising(SystemExit(1))), weakref.ref(b, raising(ValueError('not an exit')))]\n"
        "del a, b\n"
        "print('still running')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "still running" in proc.stdout, proc.stderr
    assert "SystemExit" not in proc.stderr, proc.stderr
    assert "Exception ignored in" in proc.stderr and "ValueError: not an exit" in proc.stderr, proc.stderr
