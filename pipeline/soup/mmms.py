"""Manifold mixing model soup (ALGORITHM.md): phase 1 (sequential greedy with per-component
lambdas) and phase 2 (joint mu refinement), on one optimiser loop. Ray-free: the searches are
coroutines of mixture batches, run by a Dispatcher (dispatch.py) on a plain ``evaluate(list of
beta) -> list of val accuracy`` callable or on an asynchronous pool of evaluators, where phase 1
speculates with the same result. See docs/algorithm.md."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import OPTIMIZERS, SoupConfig
from ..mixture import Threshold, validate
from . import mixing
from .dispatch import Dispatcher, Evaluator, Request, Task, dispatcher_of

# nevergrad tells CMA the bounded point, not its raw sample, and pycma then reports every bounced
# point as an "orphanated injected solution": harmless, and a multi-line warning per generation
warnings.filterwarnings("ignore", message="orphanated injected solution", module="cma")

Progress = Callable[[dict], None] | None


# ---- the one optimiser loop -----------------------------------------------------------------

class OwnRandomState:
    """A numpy global random state of one's own: pycma (CMA) and parts of nevergrad draw from
    ``np.random``'s global state, so anything else in the process that draws from it between
    two asks would change the search. Inside ``active()`` the global state is this one; on exit
    it is kept here and the caller's is put back. Not reseeded per ask: it runs on from where
    the last ask left it."""

    def __init__(self, seed: int):
        self._state = np.random.RandomState(seed % 2**32).get_state()

    @contextmanager
    def active(self):
        outer = np.random.get_state()
        np.random.set_state(self._state)
        try:
            yield
        finally:
            self._state = np.random.get_state()
            np.random.set_state(outer)


def nevergrad():
    """nevergrad, imported without touching the caller's ``np.random`` stream (some of its
    modules draw from it at import time)."""
    outer = np.random.get_state()
    try:
        import nevergrad as ng
    finally:
        np.random.set_state(outer)
    return ng


def _picked(opt) -> str:
    """The optimizer an NGOpt-family one delegates to (its last ``optim``), by class name."""
    while hasattr(opt, "optim"):
        opt = opt.optim
    return getattr(opt, "name", type(opt).__name__)


class SeededOptimizer:
    """A nevergrad optimizer deterministic from its seed alone: its parametrization's random
    state is seeded, and every call that may draw from ``np.random`` runs in its own state."""

    def __init__(self, name: str, x0: np.ndarray, lower, upper, budget: int, num_workers: int, seed: int):
        if name not in OPTIMIZERS:
            raise ValueError(f"soup.optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
        ng = nevergrad()
        self.random = OwnRandomState(seed)
        with self.random.active():
            param = ng.p.Array(init=x0, lower=lower, upper=upper)
            param.random_state.seed(seed)
            try:
                self.opt = ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=num_workers)
            except ValueError as e:  # e.g. "Cobyla does not support parallelization"
                raise ValueError(f"soup.optimizer {name!r} with num_workers={num_workers}: {e}") from e
            self.picked = _picked(self.opt) if name == "NGOpt" else name
        if self.picked not in OPTIMIZERS:  # SoupConfig keeps NGOpt to budgets where it picks Cobyla
            raise ValueError(f"soup.optimizer {name!r} picked {self.picked} for {len(np.atleast_1d(x0))} dimensions "
                             f"and budget {budget}: not one of {', '.join(OPTIMIZERS)}; name the optimizer")

    def tell_and_ask(self, told: Sequence[tuple[Any, float]], n: int) -> list:
        """Tell ``told`` (candidate, loss) in order, then ask ``n`` candidates, all in one turn of
        its own random state (a swap costs more than a Cobyla step)."""
        if not told and n == 0:
            return []
        with self.random.active():
            for candidate, loss in told:
                self.opt.tell(candidate, loss)
            return [self.opt.ask() for _ in range(n)]


def make_optimizer(name: str, x0: np.ndarray, lower, upper, budget: int, num_workers: int, seed: int):
    """A seeded nevergrad optimizer over a bounded array (sigma spans the bounds / 6), deterministic
    from ``seed`` whatever else draws from ``np.random``. SoupConfig checks the name and its
    pairing with num_workers; what only building it tells is named here."""
    return SeededOptimizer(name, np.asarray(x0), lower, upper, budget, num_workers, seed)


def _point_key(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype=np.float64).tobytes()


def minimise_steps(x0, lower, upper, budget: int, *, optimizer: str, num_workers: int, seed: int,
                   x0_loss: float | None = None):
    """The optimiser loop as a coroutine: yields each batch of fresh points, receives their losses
    (``losses = yield points``), returns (best_x, best_loss, n_evals).

    x0 goes first (or its known ``x0_loss`` is used), so the result is never worse than the
    start. Each round asks up to ``num_workers`` candidates, yields them as ONE batch and tells
    them in ask order: with a fixed seed the asks depend only on the losses, never on timing.
    Points seen before in this search are answered from memory. Ties keep the earliest point."""
    if budget < 1:
        raise ValueError(f"optimiser budget must be >= 1, got {budget}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    x0 = np.array(x0, dtype=np.float64)
    known: dict[bytes, float] = {}
    n_evals = 0
    if x0_loss is not None:
        known[_point_key(x0)] = float(x0_loss)
    start_pending = x0_loss is None
    asks_left = budget - (1 if start_pending else 0)
    opt = make_optimizer(optimizer, x0, lower, upper, max(asks_left, 1), num_workers, seed)
    best_x, best_loss = x0, (None if start_pending else float(x0_loss))
    told: list = []  # the last round's (candidate, loss), told with the next round's asks
    while start_pending or asks_left > 0:
        head = [x0] if start_pending else []
        candidates = opt.tell_and_ask(told, min(num_workers - len(head), asks_left))
        points = head + [np.array(c.value, dtype=np.float64) for c in candidates]
        fresh = list({_point_key(p): p for p in points if _point_key(p) not in known}.items())
        if fresh:
            losses = [float(v) for v in (yield [p for _, p in fresh])]
            if len(losses) != len(fresh):
                raise ValueError(f"loss_of_batch returned {len(losses)} losses for {len(fresh)} points")
            known.update((k, v) for (k, _), v in zip(fresh, losses))
            n_evals += len(fresh)
        losses = [known[_point_key(p)] for p in points]
        told = list(zip(candidates, losses[len(head):]))  # in ask order, the very Parameters ask() returned
        for x, loss in zip(points, losses):
            if best_loss is None or loss < best_loss:
                best_x, best_loss = x, loss
        start_pending = False
        asks_left -= len(candidates)
    opt.tell_and_ask(told, 0)
    return best_x, best_loss, n_evals


def drive(coroutine, answer: Callable):
    """Run a coroutine to its end, answering each thing it yields with ``answer(it)``."""
    try:
        question = next(coroutine)
        while True:
            question = coroutine.send(answer(question))
    except StopIteration as stop:
        return stop.value


def minimise(loss_of_batch: Callable[[list[np.ndarray]], list[float]], x0, lower, upper, budget: int, *,
             optimizer: str, num_workers: int, seed: int, x0_loss: float | None = None):
    """``minimise_steps`` with every batch scored by ONE ``loss_of_batch`` call.
    Returns (best_x, best_loss, n_evals)."""
    return drive(minimise_steps(x0, lower, upper, budget, optimizer=optimizer, num_workers=num_workers,
                                seed=seed, x0_loss=x0_loss), loss_of_batch)


# ---- the searches as coroutines over mixtures -----------------------------------------------

def search_steps(beta_of: Callable[[np.ndarray], np.ndarray], x0, lower, upper, budget: int, cfg: SoupConfig,
                 step: str, x0_acc: float | None = None):
    """Maximise val accuracy of ``beta_of(x)`` (minimise 1 - acc), yielding one Request per batch;
    returns (best x, its exact accuracy)."""
    acc_of: dict[bytes, float] = {}
    if x0_acc is not None:
        acc_of[_point_key(np.asarray(x0, dtype=np.float64))] = x0_acc
    opt = minimise_steps(x0, lower, upper, budget, optimizer=cfg.optimizer, num_workers=cfg.num_workers,
                         seed=cfg.seed, x0_loss=None if x0_acc is None else 1.0 - x0_acc)
    try:
        xs = next(opt)
        while True:
            scores = yield Request([beta_of(x) for x in xs], None, step)
            accs = [s.accuracy for s in scores]
            acc_of.update((_point_key(x), a) for x, a in zip(xs, accs))
            xs = opt.send([1.0 - a for a in accs])
    except StopIteration as stop:
        best_x = stop.value[0]
    finally:
        opt.close()
    return best_x, acc_of[_point_key(best_x)]  # the accuracy itself: 1 - (1 - a) may not be a


def sorted_best_first(val_accs: Sequence[float]) -> list[int]:
    """Ingredient indices by val accuracy, best first; ties keep the lower index first."""
    accs = np.asarray(val_accs, dtype=np.float64)
    if accs.ndim != 1 or accs.size == 0 or not np.isfinite(accs).all():
        raise ValueError(f"val_accs must be a non-empty list of finite numbers, got {list(val_accs)}")
    return [int(i) for i in np.argsort(-accs, kind="stable")]


# ---- phase 1 --------------------------------------------------------------------------------

@dataclass
class Phase1Result:
    beta: np.ndarray
    val_acc: float
    chosen: list[int]          # ingredient indices, in the order they joined the soup
    lambdas: list[np.ndarray]  # one per chosen ingredient after the first
    n_evals: int               # the sequential search's evaluations (whatever E and speculation)
    trace: list[tuple[int, float]] = field(default_factory=list)  # (evaluations, best val so far)
    # per candidate, in order: (ingredient, "short-circuit" | "pass 1" | "joined", accuracy
    # reached: None at the short-circuit, else the best pass's)
    decisions: list[tuple[int, str, float | None]] = field(default_factory=list)
    cost: dict = field(default_factory=dict)  # what the evaluators did (Cost.report)


def first_pass_bounds(n_chosen: int, n_components: int, bounds_delta: float):
    """lam0 = K/(K+1) in every component; the box [lam0 - delta, lam0 + delta], delta = bd * (1 - lam0)."""
    lam0 = n_chosen / (n_chosen + 1)
    delta = bounds_delta * (1.0 - lam0)
    x0 = np.full(n_components, lam0)
    return x0, np.clip(x0 - delta, 0.0, 1.0), np.clip(x0 + delta, 0.0, 1.0)


@dataclass(frozen=True)
class Soup:
    """Phase 1's state between candidates: the soup A, its accuracy and how it was built."""
    A: np.ndarray
    accA: float
    chosen: tuple[int, ...]
    lambdas: tuple[np.ndarray, ...] = ()

    def joined(self, j: int, lam: np.ndarray, acc: float) -> "Soup":
        return Soup(mixing.pairwise(self.A, lam, j), acc, self.chosen + (j,), self.lambdas + (lam,))


def mix_in(soup: Soup, j: int, cfg: SoupConfig):
    """Candidate j against the soup, as a coroutine of Requests: short-circuit, first pass, then
    (on success) the second and maybe third pass. Returns (lambda, acc) if j joins, else
    ("short-circuit" | "pass 1", acc reached). A deterministic function of (soup, j, cfg) and of
    the accuracies it is told: that is what lets phase 1 run it ahead of time."""
    A, accA = soup.A, soup.accA
    C = A.shape[1]
    budget = C * cfg.max_func_evals_per_dim
    x0, lower, upper = first_pass_bounds(len(soup.chosen), C, cfg.bounds_delta)

    def beta_of(lam):
        return mixing.pairwise(A, lam, j)

    # the sequential test is `acc0 < tau * accA: skip`; the evaluator may stop early on it
    threshold = Threshold(cfg.tau * accA)
    (score,) = yield Request([beta_of(x0)], threshold, "short-circuit")
    if score.accuracy is None or not threshold.passes(score.accuracy):
        return "short-circuit", None
    acc0 = score.accuracy
    lam1, acc1 = yield from search_steps(beta_of, x0, lower, upper, budget, cfg, "pass 1", x0_acc=acc0)
    if acc1 < accA:
        return "pass 1", acc1
    low = cfg.second_pass_low
    start2 = np.clip(lam1, low, 1.0)
    lam2, acc2 = yield from search_steps(beta_of, start2, low, 1.0, budget, cfg, "pass 2",
                                         x0_acc=acc1 if np.array_equal(start2, lam1) else None)
    passes = [(lam1, acc1), (lam2, acc2)]
    if acc2 >= (1.0 + 0.3 * (1.0 - cfg.tau)) * acc1:
        # the reference's third pass: the second pass again, started where it ended
        passes.append((yield from search_steps(beta_of, lam2, low, 1.0, budget, cfg, "pass 3", x0_acc=acc2)))
    # the best pass wins (ties: the earlier); only a clipped second start can be worse than pass 1
    return max(passes, key=lambda p: p[1])


def phase1_budget(n_ingredients: int, n_components: int, cfg: SoupConfig) -> int:
    """Upper bound on phase 1's evaluations: A, then per candidate a short-circuit and 3 passes."""
    return 1 + (n_ingredients - 1) * (1 + 3 * n_components * cfg.max_func_evals_per_dim)


# the reference's log: of 71 candidates ~60 % stopped at the short-circuit, 6 joined
PRIOR_OUTCOMES = {"short-circuit": 0.60, "pass 1": 0.32, "joined": 0.08}
PRIOR_WEIGHT = 4.0  # the prior counts as this many observed candidates


def expected_evaluations(decided: Sequence[tuple[str, int]], n_undecided: int, n_components: int,
                         cfg: SoupConfig) -> float:
    """Expected evaluations of ``n_undecided`` candidates, from the outcomes and costs seen so far
    (``decided``: (outcome, evaluations) per candidate) blended with the reference's rates."""
    per_pass = n_components * cfg.max_func_evals_per_dim
    prior_cost = {"short-circuit": 1.0, "pass 1": 1.0 + per_pass, "joined": 1.0 + 2.5 * per_pass}
    n = len(decided)
    mean = 0.0
    for outcome, prior_rate in PRIOR_OUTCOMES.items():
        costs = [e for o, e in decided if o == outcome]
        rate = (len(costs) + PRIOR_WEIGHT * prior_rate) / (n + PRIOR_WEIGHT)
        mean += rate * (sum(costs) / len(costs) if costs else prior_cost[outcome])
    return n_undecided * mean


@dataclass
class _Planned:
    """One candidate in the plan: the soup it is tried against and its running decision."""
    j: int
    soup: Soup
    task: Task
    _after: Soup | None = None

    @property
    def joins(self) -> bool:
        return self.task.done and not isinstance(self.task.result[0], str)

    def soup_after(self) -> Soup:
        """The soup the next candidate is tried against, if this one's decision stands (one
        object per decision, so the plan can tell what a later candidate assumed)."""
        if self.joins:
            if self._after is None:
                lam, acc = self.task.result
                self._after = self.soup.joined(self.j, lam, acc)
            return self._after
        return self.soup  # rejected, or undecided: speculation assumes it will be rejected


class _Reporter:
    """Turns the committed candidates' batches, in the sequential order, into the trace and the
    progress calls: the same for any E, speculation or finishing order."""

    def __init__(self, phase: int, budget: int, progress: Progress, dispatcher: Dispatcher):
        self.phase, self.budget, self.progress, self.dispatcher = phase, budget, progress, dispatcher
        self.n_evals = 0
        self.best_val: float | None = None
        self.trace: list[tuple[int, float]] = []
        self.expected: float | None = None

    def flush(self, task: Task, ingredient: int | None) -> None:
        while task.reported < len(task.log):
            batch = task.log[task.reported]
            task.reported += 1
            self.n_evals += batch.n
            if batch.best is not None:
                self.best_val = batch.best if self.best_val is None else max(self.best_val, batch.best)
            self.trace.append((self.n_evals, self.best_val))
            if self.progress is not None:
                cost = self.dispatcher.cost
                self.progress({"phase": self.phase, "ingredient": ingredient, "step": batch.step,
                               "evals": self.n_evals, "budget": self.budget,
                               "expected": self.expected if self.expected is not None else self.budget,
                               "evaluated": cost.evaluations, "dropped": cost.dropped,
                               "best_val": self.best_val, "batch": batch.n, "seconds": batch.seconds})


def _evaluate_one(beta: np.ndarray, step: str):
    (score,) = yield Request([beta], None, step)
    return score.accuracy


def phase1(val_accs: Sequence[float], n_components: int, evaluate: Evaluator, cfg: SoupConfig,
           progress: Progress = None) -> Phase1Result:
    """Sequential greedy mixing: ingredients best to worst, each mixed into the soup A with
    per-component lambdas when that does not lower A's val accuracy.

    ``evaluate`` is a plain ``evaluate(betas) -> accuracies`` callable (run strictly in order,
    one call per batch), or an asynchronous evaluator / Dispatcher over E evaluators: then idle
    evaluators run the next candidates' decisions ahead of time against the current soup
    (speculation), priority always to the candidate the sequential search decides next. A
    candidate's decision depends only on (soup, candidate, settings), so the result — chosen,
    lambdas, beta, val, trace, decisions — is the sequential one, bit for bit."""
    order = sorted_best_first(val_accs)
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    K, C = len(order), n_components
    dispatcher = dispatcher_of(evaluate)
    cost0, t0 = dispatcher.cost.copy(), time.perf_counter()
    report = _Reporter(1, phase1_budget(K, C, cfg), progress, dispatcher)
    A = mixing.one_hot(K, C, order[0])
    first = Task(_evaluate_one(A, "start"), order[0])
    report.expected = 1 + expected_evaluations([], K - 1, C, cfg)
    dispatcher.run(first, on_batch=lambda t: report.flush(t, order[0]))
    soup = Soup(A, first.result, (order[0],))  # the evaluator is the judge, not the registry's number

    candidates = order[1:]
    committed = 0
    plan: list[_Planned] = []
    decided: list[tuple[str, int]] = []
    decisions: list[tuple[int, str, float | None]] = []

    def plan_next(against: Soup) -> None:
        j = candidates[committed + len(plan)]
        plan.append(_Planned(j, against, Task(mix_in(against, j, cfg), j)))

    while committed < len(candidates):
        if not plan:
            plan_next(soup)
        # speculation: evaluators the planned candidates leave idle try the next ones
        while (dispatcher.fill([p.task for p in plan]) and dispatcher.parallel and dispatcher.size > 1
               and committed + len(plan) < len(candidates)):
            plan_next(plan[-1].soup_after())
        dispatcher.step([p.task for p in plan])
        # a candidate decided to join: what was tried after it assumed it would not
        for i, p in enumerate(plan[:-1]):
            if p.joins and plan[i + 1].soup is not p.soup_after():
                for later in plan[i + 1:]:
                    dispatcher.drop(later.task)
                del plan[i + 1:]
                break
        report.flush(plan[0].task, plan[0].j)
        while plan and plan[0].task.done:
            head = plan.pop(0)
            report.flush(head.task, head.j)
            outcome, acc = ("joined", head.task.result[1]) if head.joins else head.task.result
            if head.joins:
                soup = head.soup_after()
            decided.append((outcome, sum(b.n for b in head.task.log)))
            decisions.append((head.j, outcome, acc))
            committed += 1
            report.expected = report.n_evals + expected_evaluations(decided, len(candidates) - committed, C, cfg)
            if plan:
                report.flush(plan[0].task, plan[0].j)
    for p in plan:
        dispatcher.drop(p.task)
    dispatcher.drain()  # dropped speculation still running: its evaluations are memoised
    beta = mixing.lambdas_to_beta(list(soup.lambdas), list(soup.chosen), K, n_components=C)
    cost = dispatcher.cost.since(cost0).report(time.perf_counter() - t0, dispatcher.size)
    return Phase1Result(beta, soup.accA, list(soup.chosen), list(soup.lambdas), report.n_evals, report.trace,
                        decisions, cost)


# ---- phase 2 --------------------------------------------------------------------------------

@dataclass
class Phase2Result:
    beta: np.ndarray
    val_acc: float
    mu: np.ndarray  # (K, C); 1 on the rows of ingredients phase 1 did not choose
    n_evals: int
    trace: list[tuple[int, float]] = field(default_factory=list)
    cost: dict = field(default_factory=dict)


def phase2(beta: np.ndarray, evaluate: Evaluator, cfg: SoupConfig, progress: Progress = None) -> Phase2Result:
    """Joint refinement of phase 1's beta over the chosen ingredients:
    beta'[j, c] = mu[j, c] beta[j, c] / P_c, mu in cfg.phase2.bounds, start 1. The caller keeps
    the result only if it beats phase 1 on val (and runs it only if cfg.phase2.enabled).
    One search: its W asks per round are spread over the evaluators, nothing is speculated."""
    beta = validate(beta)
    rows = np.flatnonzero(beta.any(axis=1))  # the chosen ingredients; other rows stay 0
    K, C = beta.shape
    budget = len(rows) * C * cfg.phase2.evals_per_dim
    dispatcher = dispatcher_of(evaluate)
    cost0, t0 = dispatcher.cost.copy(), time.perf_counter()
    report = _Reporter(2, budget if len(rows) > 1 else 1, progress, dispatcher)

    def full_mu(mu_rows: np.ndarray) -> np.ndarray:
        mu = np.ones((K, C))
        mu[rows] = mu_rows
        return mu

    def beta_of(mu_rows):
        return mixing.mu_to_beta(beta, full_mu(mu_rows))

    def cost() -> dict:
        return dispatcher.cost.since(cost0).report(time.perf_counter() - t0, dispatcher.size)

    if len(rows) == 1:  # one ingredient: every mu gives the same mixture
        acc = dispatcher.run(Task(_evaluate_one(beta, "mu")), on_batch=lambda t: report.flush(t, None))
        return Phase2Result(beta, acc, np.ones((K, C)), report.n_evals, report.trace, cost())
    low, high = cfg.phase2.bounds
    search = search_steps(beta_of, np.ones((len(rows), C)), low, high, budget, cfg, "mu")
    mu_best, acc = dispatcher.run(Task(search), on_batch=lambda t: report.flush(t, None))
    return Phase2Result(beta_of(mu_best), acc, full_mu(mu_best), report.n_evals, report.trace, cost())
