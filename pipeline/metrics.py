"""Dashboard metrics (ray.util.metrics, exported by every node's metrics agent; Prometheus
names get a `ray_` prefix): soup evaluations done, best val accuracy, evaluation latency, and
finetune trials running/finished (the driver's `RunMetrics`); per evaluator actor the seconds
it spent evaluating and per call (`EvaluatorMetrics`), from which the dashboard draws each
node's busy fraction (Ray labels every series with its node, `NodeAddress`). Every series is
labelled with the command's run id (`run`, made when the command starts) and its `stage`.
Gauges are re-set by a background thread while the run lives, because Ray drops a gauge that is
not set again for ~20 s. `dashboards/frankensoup.json` is the Grafana dashboard of these metrics."""
from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time

LATENCY_BOUNDARIES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
TAG_KEYS = ("run", "stage")

# the id of the command running now: every metric's `run` label (run.json's "run"); set in the
# environment so the actors a stage starts see it too (pool.start_evaluators passes it on)
RUN_ENV = "FRANKENSOUP_RUN"


def new_run() -> str:
    """Make the id of a command that starts now (sortable: UTC time + random) and make it
    current; FRANKENSOUP_RUN set by the caller (e.g. in a `ray job submit` env) is kept."""
    if not os.environ.get(RUN_ENV):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        os.environ[RUN_ENV] = f"{stamp}-{secrets.token_hex(3)}"
    return os.environ[RUN_ENV]


def current_run() -> str:
    """The current command's id (made now if none was: a stage called from Python)."""
    return os.environ.get(RUN_ENV) or new_run()


class RunMetrics:
    def __init__(self, run: str, stage: str, refresh_s: float = 5.0):
        from ray.util import metrics

        self.tags = {"run": run, "stage": stage}
        self.evaluations = metrics.Counter("frankensoup_soup_evaluations",
                                           description="candidate mixtures evaluated", tag_keys=TAG_KEYS)
        self.best_val = metrics.Gauge("frankensoup_soup_best_val_accuracy",
                                      description="best val accuracy found so far", tag_keys=TAG_KEYS)
        self.latency = metrics.Histogram("frankensoup_soup_eval_latency_seconds",
                                         description="seconds per evaluated batch of mixtures",
                                         boundaries=LATENCY_BOUNDARIES, tag_keys=TAG_KEYS)
        self.trials_running = metrics.Gauge("frankensoup_trials_running",
                                            description="finetune trials running", tag_keys=TAG_KEYS)
        self.trials_finished = metrics.Gauge("frankensoup_trials_finished",
                                             description="finetune trials finished", tag_keys=TAG_KEYS)
        self._gauges: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, args=(refresh_s,), daemon=True)
        self._thread.start()

    def _set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = float(value)
        getattr(self, name).set(float(value), tags=self.tags)

    def _refresh(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                items = list(self._gauges.items())
            for name, value in items:
                getattr(self, name).set(value, tags=self.tags)

    def on_batch(self, n_evaluations: int, best_val: float | None, seconds: float) -> None:
        """Hook for the soup search: one evaluated batch."""
        if n_evaluations:
            self.evaluations.inc(n_evaluations, tags=self.tags)
            self.latency.observe(seconds, tags=self.tags)
        if best_val is not None:
            self._set("best_val", best_val)

    def on_trials(self, running: int, finished: int) -> None:
        self._set("trials_running", running)
        self._set("trials_finished", finished)

    def close(self) -> None:
        self._stop.set()


def tune_callback(metrics: RunMetrics):
    """A Ray Tune callback that keeps the trials running/finished gauges current."""
    from ray.tune import Callback

    class TrialGauges(Callback):
        def __init__(self):
            self.running: set[str] = set()
            self.finished: set[str] = set()

        def _publish(self):
            metrics.on_trials(len(self.running), len(self.finished))

        def on_trial_start(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._publish()

        def on_trial_restore(self, iteration, trials, trial, **info):
            self.running.add(trial.trial_id)
            self._publish()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self.finished.add(trial.trial_id)
            self._publish()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.running.discard(trial.trial_id)
            self._publish()

    return TrialGauges()


class EvaluatorMetrics:
    """In a mixture evaluator actor: ``with metrics.evaluating(): ...`` around each evaluate call
    adds its seconds to ``frankensoup_evaluator_busy_seconds`` (a counter: its rate is the actor's
    busy fraction) and observes ``frankensoup_evaluator_call_seconds``. Ray labels every series
    with the node (``NodeAddress``) and worker (``WorkerId``) it comes from, so the dashboard
    shows each node's busy fraction and latency."""

    def __init__(self, run: str | None = None, stage: str = "soup"):
        from ray.util import metrics

        self.tags = {"run": run or current_run(), "stage": stage}
        self.busy = metrics.Counter("frankensoup_evaluator_busy_seconds",
                                    description="seconds an evaluator actor spent evaluating mixtures",
                                    tag_keys=TAG_KEYS)
        self.call = metrics.Histogram("frankensoup_evaluator_call_seconds",
                                      description="seconds per evaluate call of an evaluator actor",
                                      boundaries=LATENCY_BOUNDARIES, tag_keys=TAG_KEYS)

    @contextlib.contextmanager
    def evaluating(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            if seconds > 0:  # a Ray counter takes positive increments only
                self.busy.inc(seconds, tags=self.tags)
            self.call.observe(seconds, tags=self.tags)
