"""The soup search's progress: console lines and the Ray dashboard's metrics."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

Log = Callable[[str], None]


def dashboard_metrics(run: str):
    """Ray dashboard metrics when Ray's metrics are available; None otherwise."""
    try:
        from ..metrics import RunMetrics

        return RunMetrics(run)
    except Exception:  # no Ray connection or metrics agent: the run goes on without a dashboard
        return None


class ProgressPrinter:
    """The core's progress dict -> one line per new ingredient/step, and at most every
    ``every_s`` seconds in between; also feeds the dashboard metrics."""

    def __init__(self, ids: Sequence[str], log: Log, metrics=None, every_s: float = 10.0):
        self.ids, self.log, self.metrics, self.every_s = list(ids), log, metrics, every_s
        self._last_where = None
        self._last_time = 0.0

    def __call__(self, p: dict) -> None:
        if self.metrics is not None:
            self.metrics.on_batch(p["batch"], p["best_val"], p["seconds"])
        where = (p["phase"], p.get("ingredient"), p.get("step"))
        now = time.time()
        if where == self._last_where and now - self._last_time < self.every_s:
            return
        self._last_where, self._last_time = where, now
        ing = p.get("ingredient")
        name = "all chosen" if ing is None else self.ids[ing]
        expected = p.get("expected", p["budget"])
        extra = f", {p['dropped']} speculative dropped" if p.get("dropped") else ""
        self.log(f"soup phase {p['phase']} | ingredient {name} ({p.get('step')}) | "
                 f"evaluations {p['evals']} of ~{expected:.0f} expected (at most {p['budget']}{extra}) | "
                 f"best val {p['best_val']:.4f}")
