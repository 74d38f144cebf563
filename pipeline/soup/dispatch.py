"""Running the search's coroutines on evaluators: one ``Dispatcher`` between the algorithm and
an asynchronous evaluator (Ray-free; the Ray pool in pool.py is one such evaluator).

The algorithm is written as coroutines (generators) that yield a ``Request`` — a batch of
mixtures, maybe with a ``Threshold`` — and receive one ``Score`` per mixture. Because every
accuracy is a deterministic function of the mixture, a coroutine's trajectory does not depend
on when or where its requests were evaluated; the dispatcher only decides *when*: free
evaluators go to the pending mixtures of the tasks in the order the caller lists them (its
priority), identical mixtures are evaluated once (a memo by ``mixture_key``; a below-threshold
answer is memoised as the threshold it failed, never as an accuracy) and every evaluation is counted. See
docs/algorithm.md, "Speculative phase 1"."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .. import mixture
from ..mixture import AsyncEvaluator, Evaluate, Score, Threshold


@dataclass
class Request:
    """What a coroutine asks: val accuracy of ``betas``; with a threshold, each mixture may be
    answered ``below`` (Score.accuracy None) once it provably fails ``threshold.passes``."""
    betas: list[np.ndarray]
    threshold: Threshold | None = None
    step: str = ""


Coroutine = Generator[Request, list[Score], object]


# ---- evaluators ----------------------------------------------------------------------------

# what every search accepts: dispatcher_of() makes a Dispatcher of any of them
Evaluator = Union[Evaluate, AsyncEvaluator, "Dispatcher"]


class SyncEvaluator:
    """A plain ``evaluate(betas) -> accuracies`` callable seen as an asynchronous evaluator with one
    worker that runs everything submitted since the last ``wait`` as ONE call (a batch). Not
    ``parallel``: the driver gives it only the sequential search's own requests. A callable with
    ``score(betas, thresholds) -> list[Score]`` (the MixtureEvaluator) gets the thresholds."""

    parallel = False
    size = 1

    def __init__(self, evaluate: Callable):
        self.evaluate = evaluate
        self._queued: list[tuple[int, np.ndarray, Threshold | None]] = []
        self._tickets = itertools.count()

    def free(self) -> int:
        return 1 << 30  # batches are the caller's business

    def submit(self, beta: np.ndarray, threshold: Threshold | None = None, priority: int = 0) -> int:
        ticket = next(self._tickets)
        self._queued.append((ticket, beta, threshold))
        return ticket

    def wait(self) -> list[tuple[int, Score]]:
        queued, self._queued = self._queued, []
        if not queued:
            return []
        betas = [b for _, b, _ in queued]
        t0 = time.perf_counter()
        score = getattr(self.evaluate, "score", None)
        if score is not None:
            scores = list(score(betas, [t for _, _, t in queued]))
            if len(scores) != len(betas):
                raise ValueError(f"evaluate returned {len(scores)} scores for {len(betas)} mixtures")
        else:
            accs = mixture.check_accuracies(self.evaluate(betas), len(betas))
            each = (time.perf_counter() - t0) / len(betas)
            scores = [Score(a, None, each) for a in accs]
        return [(ticket, s) for (ticket, _, _), s in zip(queued, scores)]


# ---- tasks and the dispatcher ---------------------------------------------------------------

@dataclass
class Batch:
    """One answered request of a task, as the sequential search would log it."""
    step: str
    n: int
    best: float | None  # best accuracy in the batch (None: all below a threshold)
    seconds: float


_RANKS = itertools.count()


class Task:
    """One coroutine in flight: its current request, the answers gathered so far, and the log of
    its answered batches (in its own order, which is the sequential order within it). ``rank``
    orders tasks by creation: phase 1 creates its candidates' tasks in the sequential order, so
    a lower rank is nearer the critical path (the evaluators' queue runs it first)."""

    def __init__(self, coroutine: Coroutine, label=None):
        self.coroutine, self.label = coroutine, label
        self.rank = next(_RANKS)
        self.request: Request | None = None
        self.answers: list[Score | None] = []
        self.sent: list[bool] = []
        self.log: list[Batch] = []
        self.done = False
        self.dropped = False
        self.result = None
        self.spent = 0  # evaluations run on this task's behalf
        self.reported = 0  # log entries the caller has reported
        self._advance(None)

    def _advance(self, scores: list[Score] | None) -> None:
        try:
            request = next(self.coroutine) if scores is None else self.coroutine.send(scores)
        except StopIteration as stop:
            self.done, self.result, self.request = True, stop.value, None
            return
        if not request.betas:
            raise ValueError("a coroutine asked for an empty batch")
        self.request = request
        self.answers = [None] * len(request.betas)
        self.sent = [False] * len(request.betas)

    @property
    def ready(self) -> bool:
        return not self.done and all(a is not None for a in self.answers)

    def finish_batch(self) -> None:
        answers = list(self.answers)
        threshold = self.request.threshold
        # a failed threshold test logs no accuracy, whether it stopped early or came from the memo
        accs = [a.accuracy for a in answers
                if a.accuracy is not None and (threshold is None or threshold.passes(a.accuracy))]
        self.log.append(Batch(self.request.step, len(answers), max(accs) if accs else None,
                              sum(a.seconds for a in answers)))
        self._advance(answers)

    def drop(self) -> None:
        self.dropped = True
        self.coroutine.close()  # frees the optimizer (a recast one holds a thread)


@dataclass
class Cost:
    """What the evaluators did. ``images`` is None when an evaluator does not report them."""
    evaluations: int = 0
    images: int | None = 0
    memo_hits: int = 0
    dropped: int = 0          # evaluations spent on speculation that was dropped
    busy_seconds: float = 0.0

    def since(self, before: "Cost") -> "Cost":
        images = None if self.images is None or before.images is None else self.images - before.images
        return Cost(self.evaluations - before.evaluations, images, self.memo_hits - before.memo_hits,
                    self.dropped - before.dropped, self.busy_seconds - before.busy_seconds)

    def copy(self) -> "Cost":
        return Cost(**self.__dict__)

    def report(self, wall_seconds: float, n_evaluators: int) -> dict:
        busy = self.busy_seconds / (wall_seconds * n_evaluators) if wall_seconds > 0 else 0.0
        return {"evaluations": self.evaluations, "images_scored": self.images, "memo_hits": self.memo_hits,
                "speculative_dropped": self.dropped, "wall_seconds": round(wall_seconds, 3),
                "evaluators": n_evaluators, "busy_fraction": round(min(busy, 1.0), 4)}


@dataclass
class _Flight:
    key: str
    beta: np.ndarray
    threshold: Threshold | None
    waiters: list[tuple[Task, int]] = field(default_factory=list)


def settles(failed: Threshold, asked: Threshold) -> bool:
    """Does a mixture known to fail ``failed`` also fail ``asked``? Failing ``acc >= v`` means
    acc < v; failing ``acc > v`` means acc <= v. Either fails any test at least as demanding."""
    if failed.strict and not asked.strict:
        return asked.value > failed.value  # acc <= v may still reach acc >= v
    return asked.value >= failed.value


class DictMemo:
    """The in-process memo: full accuracies by mixture key, and the thresholds a mixture is known
    to fail (an early-stopped test: no accuracy, but a fact). A memo is anything with
    ``get(beta) -> accuracy | None`` and ``put(beta, accuracy)``, and optionally
    ``failed(beta) -> [Threshold]`` and ``put_failed(beta, threshold)`` (the soup stage's is
    persistent)."""

    def __init__(self):
        self._accs: dict[str, float] = {}
        self._failed: dict[str, list[Threshold]] = {}

    def get(self, beta: np.ndarray) -> float | None:
        return self._accs.get(mixture.mixture_key(beta))

    def put(self, beta: np.ndarray, accuracy: float) -> None:
        self._accs.setdefault(mixture.mixture_key(beta), float(accuracy))

    def failed(self, beta: np.ndarray) -> list[Threshold]:
        return self._failed.get(mixture.mixture_key(beta), [])

    def put_failed(self, beta: np.ndarray, threshold: Threshold) -> None:
        self._failed.setdefault(mixture.mixture_key(beta), []).append(threshold)


class Dispatcher:
    """Tasks' requests -> an asynchronous evaluator (``free()``, ``submit(beta, threshold)``,
    ``wait() -> [(ticket, Score)]``, ``parallel``, ``size``), or a plain ``evaluate`` callable.
    Also a synchronous ``evaluate`` itself: ``dispatcher(betas)`` and ``dispatcher.score(betas,
    thresholds)`` for the searches that are not coroutines (baselines, greedy soup)."""

    def __init__(self, evaluator, memo=None):
        if not hasattr(evaluator, "submit"):
            evaluator = SyncEvaluator(evaluator)
        self.evaluator = evaluator
        self.memo = memo if memo is not None else DictMemo()
        self.cost = Cost()
        self._flights: dict[int, _Flight] = {}
        self._by_key: dict[str, list[int]] = {}

    @property
    def parallel(self) -> bool:
        return bool(self.evaluator.parallel)

    @property
    def size(self) -> int:
        return int(self.evaluator.size)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def _memo_hit(self, beta: np.ndarray) -> None:
        """A mixture answered without evaluating it; a memo that tells earlier runs' answers
        from this run's (``note_hit``) is told."""
        self.cost.memo_hits += 1
        note = getattr(self.memo, "note_hit", None)
        if note is not None:
            note(beta)

    def fill(self, tasks: Sequence[Task]) -> bool:
        """Send the tasks' unsent mixtures, in task order, while evaluators are free; answer
        what the memo or an identical evaluation in flight can. True if evaluators are left free.
        The first live task is the critical path: later tasks (speculation) are filled only
        while it waits on an evaluation, so where the memo answers the whole path nothing is
        evaluated ahead of it."""
        live = [t for t in tasks if not t.done and not t.dropped]
        for n, task in enumerate(live):
            if n > 0 and live[0].ready:
                return False  # the memo answered the path's request: no speculation for it
            request = task.request
            for i, beta in enumerate(request.betas):
                if task.sent[i]:
                    continue
                beta = mixture.validate(beta)
                key = mixture.mixture_key(beta)
                known = self.memo.get(beta)
                if known is not None:
                    task.sent[i], task.answers[i] = True, Score(known, 0)
                    self._memo_hit(beta)
                    continue
                if request.threshold is not None and hasattr(self.memo, "failed") and any(
                        settles(f, request.threshold) for f in self.memo.failed(beta)):
                    # an earlier early-stopped test settles this one: the same decision, no images
                    task.sent[i], task.answers[i] = True, Score(None, 0)
                    self._memo_hit(beta)
                    continue
                twin = next((t for t in self._by_key.get(key, ())
                             if self._flights[t].threshold in (None, request.threshold)), None)
                if twin is not None:
                    self._flights[twin].waiters.append((task, i))
                    task.sent[i] = True
                    continue
                if self.evaluator.free() <= 0:
                    return False
                if getattr(self.evaluator, "prioritised", False):
                    ticket = self.evaluator.submit(beta, request.threshold, task.rank)
                else:
                    ticket = self.evaluator.submit(beta, request.threshold)
                self._flights[ticket] = _Flight(key, beta, request.threshold, [(task, i)])
                self._by_key.setdefault(key, []).append(ticket)
                task.sent[i] = True
        if live and live[0].ready:
            return False
        return self.evaluator.free() > 0

    def wait(self) -> None:
        """Block until evaluations come back; hand each answer to the tasks waiting on it."""
        if not self._flights:
            raise RuntimeError("the dispatcher has nothing in flight to wait for")
        for ticket, score in self.evaluator.wait():
            flight = self._flights.pop(ticket)
            self._by_key[flight.key].remove(ticket)
            if not self._by_key[flight.key]:
                del self._by_key[flight.key]
            self.cost.evaluations += 1
            self.cost.busy_seconds += score.seconds
            if self.cost.images is not None:
                self.cost.images = None if score.images is None else self.cost.images + score.images
            if score.accuracy is not None:
                mixture.check_accuracies([score.accuracy], 1)
                self.memo.put(flight.beta, score.accuracy)
            elif flight.threshold is not None and hasattr(self.memo, "put_failed"):
                self.memo.put_failed(flight.beta, flight.threshold)
            live = [(t, i) for t, i in flight.waiters if not t.dropped]
            if not live:
                self.cost.dropped += 1
                continue
            live[0][0].spent += 1
            for task, i in live:
                if score.below and task.request.threshold != flight.threshold:
                    task.sent[i] = False  # answered for another threshold: ask again
                else:
                    task.answers[i] = score

    def step(self, tasks: Sequence[Task]) -> list[Task]:
        """Fill, then (if no task can move on without it) wait once; returns the tasks whose
        batch was answered, each advanced to its next request."""
        self.fill(tasks)
        ready = [t for t in tasks if not t.dropped and t.ready]
        if not ready:
            self.wait()
            ready = [t for t in tasks if not t.dropped and t.ready]
        for t in ready:
            t.finish_batch()
        return ready

    def drop(self, task: Task) -> None:
        """Abandon a task: what it already spent counts as dropped speculation; its evaluations
        in flight finish (they are memoised) and count as dropped if nobody else wants them."""
        if not task.dropped:
            task.drop()
            self.cost.dropped += task.spent

    def drain(self) -> None:
        """Wait for every evaluation still in flight (dropped speculation at the end of a phase)."""
        while self._flights:
            self.wait()

    def run(self, task: Task, on_batch: Callable[[Task], None] | None = None):
        """Drive one task to its end; returns its result."""
        while not task.done:
            for t in self.step([task]):
                if on_batch is not None:
                    on_batch(t)
        return task.result

    # -- the synchronous evaluate, for searches that are not coroutines --

    def score(self, betas: Sequence[np.ndarray], thresholds: Sequence[Threshold | None] | None = None) -> list[Score]:
        thresholds = list(thresholds) if thresholds is not None else [None] * len(betas)
        groups: dict = {}
        for i, t in enumerate(thresholds):
            groups.setdefault(t, []).append(i)
        out: list[Score | None] = [None] * len(betas)
        for t, idx in groups.items():
            scores = self.run(Task(_ask(Request([betas[i] for i in idx], t))))
            for i, s in zip(idx, scores):
                out[i] = s
        return out  # type: ignore[return-value]

    def __call__(self, betas: Sequence[np.ndarray]) -> list[float]:
        return [s.accuracy for s in self.score(betas)]


def _ask(request: Request) -> Coroutine:
    return (yield request)


def dispatcher_of(evaluate) -> Dispatcher:
    """``evaluate`` as a Dispatcher: itself, an asynchronous evaluator, or a plain callable."""
    return evaluate if isinstance(evaluate, Dispatcher) else Dispatcher(evaluate)
