"""The soup search's progress: the console (a bar or status lines) and the Ray dashboard's metrics."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from ..console import Progress

Log = Callable[[str], None]


def dashboard_metrics(run: str):
    """Ray dashboard metrics of the soup stage of command ``run`` when Ray's metrics are
    available; None otherwise."""
    try:
        from ..metrics import RunMetrics

        return RunMetrics(run, "soup")
    except Exception:  # no Ray connection or metrics agent: the run goes on without a dashboard
        return None


class ProgressPrinter:
    """The core's progress dict -> the console (console.Progress per phase: a bar on a terminal,
    otherwise a status line at each new phase and at most every ``every_s`` seconds, each with
    the rate and ETA of the expected evaluations); also feeds the dashboard metrics."""

    def __init__(self, ids: Sequence[str], log: Log, metrics=None, every_s: float = 10.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.ids, self.log, self.metrics, self.every_s = list(ids), log, metrics, every_s
        self.stream, self.clock = stream, clock
        self._phase = None
        self._progress: Progress | None = None
        self._expected = 0.0

    def __call__(self, p: dict) -> None:
        if self.metrics is not None:
            self.metrics.on_batch(p["batch"], p["best_val"], p["seconds"])
        expected = p.get("expected", p["budget"])
        new_phase = p["phase"] != self._phase
        if new_phase:
            self.close()
            self._phase = p["phase"]
            self._progress = Progress(expected, "soup", "evaluation", every_s=self.every_s, stream=self.stream,
                                      log=self.log, clock=self.clock)
        self._expected = expected
        ing = p.get("ingredient")
        name = "all chosen" if ing is None else self.ids[ing]
        extra = f", {p['dropped']} speculative dropped" if p.get("dropped") else ""
        best = p["best_val"]
        text = (f"phase {p['phase']} | ingredient {name} ({p.get('step')}) | "
                f"evaluations {p['evals']} of ~{expected:.0f} expected (at most {p['budget']}{extra}) | "
                f"best val {best:.4f}")
        self._progress.update(p["evals"], expected, text=text, force=new_phase,
                              desc=f"soup phase {p['phase']} {name}", best_val=best)

    def say(self, line: str) -> None:
        """A stage line after a method's work: the bar of the phase it ended closes first."""
        self.close()
        self.log(line)

    def close(self, finished: bool = True) -> None:
        """Ends the current phase's bar (the next phase, a method's end, or the end of the
        search) at the evaluations it made, saying so when they were fewer than expected;
        ``finished=False`` (the search failed) leaves it where it stopped."""
        if self._progress is None:
            return
        progress, self._progress = self._progress, None
        not_needed = math.ceil(self._expected) - round(progress.done)  # of the total the bar showed
        note = f"stopped early: {not_needed} evaluations not needed" if finished and not_needed > 0 else None
        if progress.bar is not None:  # the ingredient it last worked on says nothing at the end
            progress.bar.set_description_str(f"soup phase {self._phase}", refresh=False)
        progress.close(note, finished=finished)
