"""Manifold mixing model soup (ALGORITHM.md): phase 1 (sequential greedy with per-component
lambdas) and phase 2 (joint mu refinement), on one optimiser loop. Ray-free: everything is
judged by an ``evaluate(list of beta) -> list of val accuracy`` callable, one call per batch.
See docs/algorithm.md."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import nevergrad as ng
import numpy as np
from nevergrad.optimization.optimizerlib import NGOptBase

from ..config import SoupConfig
from . import mixture

# nevergrad tells CMA the bounded point, not its raw sample, and pycma then reports every bounced
# point as an "orphanated injected solution": harmless, and a multi-line warning per generation
warnings.filterwarnings("ignore", message="orphanated injected solution", module="cma")

Evaluate = Callable[[list[np.ndarray]], list[float]]
Progress = Callable[[dict], None] | None


# ---- the one optimiser loop -----------------------------------------------------------------

def make_optimizer(name: str, x0: np.ndarray, lower, upper, budget: int, num_workers: int, seed: int):
    """A seeded nevergrad optimizer over a bounded array (sigma spans the bounds / 6)."""
    if name not in ng.optimizers.registry:
        raise ValueError(f"soup.optimizer: unknown nevergrad optimizer {name!r}")
    param = ng.p.Array(init=x0, lower=lower, upper=upper)
    param.random_state.seed(seed)
    try:
        opt = ng.optimizers.registry[name](parametrization=param, budget=budget, num_workers=num_workers)
    except ValueError as e:  # e.g. "Cobyla does not support parallelization"
        raise ValueError(f"soup.optimizer {name!r} with num_workers={num_workers}: {e}") from e
    if num_workers > 1 and isinstance(opt, NGOptBase):
        # its parallel pick is MetaModel, which crashes inside sklearn with numpy 2.x
        raise ValueError(f"soup.optimizer {name!r} cannot run with num_workers={num_workers} > 1: it picks "
                         "MetaModel, which crashes with numpy 2.x; name one (CMA, TwoPointsDE) or set num_workers=1")
    return opt


def _point_key(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype=np.float64).tobytes()


def minimise(loss_of_batch: Callable[[list[np.ndarray]], list[float]], x0, lower, upper, budget: int, *,
             optimizer: str, num_workers: int, seed: int, x0_loss: float | None = None):
    """Minimise over a box with at most ``budget`` points sent to ``loss_of_batch``.

    x0 goes first (or its known ``x0_loss`` is used), so the result is never worse than the
    start. Each round asks up to ``num_workers`` candidates, scores them in ONE batch call and
    tells them in ask order: with a fixed seed the asks are the same whatever the timing.
    Points seen before are answered from memory. Returns (best_x, best_loss, n_evals);
    ties keep the earliest point."""
    if budget < 1:
        raise ValueError(f"optimiser budget must be >= 1, got {budget}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    x0 = np.array(x0, dtype=np.float64)
    known: dict[bytes, float] = {}
    n_evals = 0

    def score(points: list[np.ndarray]) -> list[float]:
        nonlocal n_evals
        fresh = list({_point_key(p): p for p in points if _point_key(p) not in known}.items())
        if fresh:
            losses = [float(v) for v in loss_of_batch([p for _, p in fresh])]
            if len(losses) != len(fresh):
                raise ValueError(f"loss_of_batch returned {len(losses)} losses for {len(fresh)} points")
            known.update((k, v) for (k, _), v in zip(fresh, losses))
            n_evals += len(fresh)
        return [known[_point_key(p)] for p in points]

    if x0_loss is not None:
        known[_point_key(x0)] = float(x0_loss)
    start_pending = x0_loss is None
    asks_left = budget - (1 if start_pending else 0)
    opt = make_optimizer(optimizer, x0, lower, upper, max(asks_left, 1), num_workers, seed)
    best_x, best_loss = x0, (None if start_pending else float(x0_loss))
    while start_pending or asks_left > 0:
        head = [x0] if start_pending else []
        candidates = [opt.ask() for _ in range(min(num_workers - len(head), asks_left))]
        points = head + [np.array(c.value, dtype=np.float64) for c in candidates]
        losses = score(points)
        for c, loss in zip(candidates, losses[len(head):]):
            opt.tell(c, loss)  # in ask order, the very Parameter that ask() returned
        for x, loss in zip(points, losses):
            if best_loss is None or loss < best_loss:
                best_x, best_loss = x, loss
        start_pending = False
        asks_left -= len(candidates)
    return best_x, best_loss, n_evals


# ---- bookkeeping shared by both phases ------------------------------------------------------

class _Judge:
    """Wraps ``evaluate``: checks its answers, counts evaluations, keeps the running best and
    the trace, and reports every batch to ``progress``."""

    def __init__(self, evaluate: Evaluate, phase: int, budget: int, progress: Progress):
        self.evaluate, self.phase, self.budget, self.progress = evaluate, phase, budget, progress
        self.n_evals = 0
        self.best_val: float | None = None
        self.trace: list[tuple[int, float]] = []
        self.where: dict = {}

    def __call__(self, betas: list[np.ndarray]) -> list[float]:
        betas = [mixture.validate(b) for b in betas]
        t0 = time.perf_counter()
        accs = mixture.check_accuracies(self.evaluate(betas), len(betas))
        seconds = time.perf_counter() - t0
        self.n_evals += len(betas)
        self.best_val = max(accs + ([] if self.best_val is None else [self.best_val]))
        self.trace.append((self.n_evals, self.best_val))
        if self.progress is not None:
            self.progress({"phase": self.phase, **self.where, "evals": self.n_evals, "budget": self.budget,
                           "best_val": self.best_val, "batch": len(betas), "seconds": seconds})
        return accs


def _search(judge: _Judge, beta_of: Callable[[np.ndarray], np.ndarray], x0, lower, upper, budget: int,
            cfg: SoupConfig, x0_acc: float | None = None) -> tuple[np.ndarray, float]:
    """Maximise val accuracy of ``beta_of(x)``: minimise 1 - acc; returns (best x, its exact acc)."""
    acc_of: dict[bytes, float] = {}
    if x0_acc is not None:
        acc_of[_point_key(np.asarray(x0, dtype=np.float64))] = x0_acc

    def loss_of_batch(xs: list[np.ndarray]) -> list[float]:
        accs = judge([beta_of(x) for x in xs])
        acc_of.update((_point_key(x), a) for x, a in zip(xs, accs))
        return [1.0 - a for a in accs]

    best_x, _, _ = minimise(loss_of_batch, x0, lower, upper, budget, optimizer=cfg.optimizer,
                            num_workers=cfg.num_workers, seed=cfg.seed,
                            x0_loss=None if x0_acc is None else 1.0 - x0_acc)
    return best_x, acc_of[_point_key(best_x)]  # the accuracy itself: 1 - (1 - a) may not be a


def check_settings(cfg: SoupConfig) -> None:
    """Settings the config model does not bound, checked before any evaluation is spent."""
    if not 0.0 <= cfg.second_pass_low < 1.0:
        raise ValueError(f"soup.second_pass_low must lie in [0, 1), got {cfg.second_pass_low}")
    low, high = cfg.phase2.bounds
    if not 0.0 < low <= 1.0 <= high:
        raise ValueError(f"soup.phase2.bounds must satisfy 0 < low <= 1 <= high (mu starts at 1), got {cfg.phase2.bounds}")


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
    n_evals: int
    trace: list[tuple[int, float]] = field(default_factory=list)  # (evaluations, best val so far)


def first_pass_bounds(n_chosen: int, n_components: int, bounds_delta: float):
    """lam0 = K/(K+1) in every component; the box [lam0 - delta, lam0 + delta], delta = bd * (1 - lam0)."""
    lam0 = n_chosen / (n_chosen + 1)
    delta = bounds_delta * (1.0 - lam0)
    x0 = np.full(n_components, lam0)
    return x0, np.clip(x0 - delta, 0.0, 1.0), np.clip(x0 + delta, 0.0, 1.0)


def _mix_in(judge: _Judge, A: np.ndarray, accA: float, j: int, cfg: SoupConfig,
            n_chosen: int) -> tuple[np.ndarray, float] | None:
    """Try ingredient j against the soup A: short-circuit, first pass, then (on success) the
    second and maybe third pass. Returns (lambda, acc) if j joins, else None."""
    C = A.shape[1]
    budget = C * cfg.max_func_evals_per_dim
    x0, lower, upper = first_pass_bounds(n_chosen, C, cfg.bounds_delta)

    def beta_of(lam):
        return mixture.pairwise(A, lam, j)

    judge.where = {"ingredient": j, "step": "short-circuit"}
    acc0 = judge([beta_of(x0)])[0]
    if acc0 < cfg.tau * accA:
        return None
    judge.where["step"] = "pass 1"
    lam1, acc1 = _search(judge, beta_of, x0, lower, upper, budget, cfg, x0_acc=acc0)
    if acc1 < accA:
        return None
    low = cfg.second_pass_low
    start2 = np.clip(lam1, low, 1.0)
    judge.where["step"] = "pass 2"
    lam2, acc2 = _search(judge, beta_of, start2, low, 1.0, budget, cfg,
                         x0_acc=acc1 if np.array_equal(start2, lam1) else None)
    passes = [(lam1, acc1), (lam2, acc2)]
    if acc2 >= (1.0 + 0.3 * (1.0 - cfg.tau)) * acc1:
        # the reference's third pass: the second pass again, started where it ended
        judge.where["step"] = "pass 3"
        passes.append(_search(judge, beta_of, lam2, low, 1.0, budget, cfg, x0_acc=acc2))
    # the best pass wins (ties: the earlier); only a clipped second start can be worse than pass 1
    return max(passes, key=lambda p: p[1])


def phase1_budget(n_ingredients: int, n_components: int, cfg: SoupConfig) -> int:
    """Upper bound on phase 1's evaluations: A, then per candidate a short-circuit and 3 passes."""
    return 1 + (n_ingredients - 1) * (1 + 3 * n_components * cfg.max_func_evals_per_dim)


def phase1(val_accs: Sequence[float], n_components: int, evaluate: Evaluate, cfg: SoupConfig,
           progress: Progress = None) -> Phase1Result:
    """Sequential greedy mixing: ingredients best to worst, each mixed into the soup A with
    per-component lambdas when that does not lower A's val accuracy."""
    check_settings(cfg)
    order = sorted_best_first(val_accs)
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    K, C = len(order), n_components
    judge = _Judge(evaluate, 1, phase1_budget(K, C, cfg), progress)
    chosen = [order[0]]
    A = mixture.one_hot(K, C, order[0])
    judge.where = {"ingredient": order[0], "step": "start"}
    accA = judge([A])[0]  # the evaluator is the judge, not the registry's number
    lambdas: list[np.ndarray] = []
    for j in order[1:]:
        joined = _mix_in(judge, A, accA, j, cfg, len(chosen))
        if joined is None:
            continue
        lam, accA = joined
        A = mixture.pairwise(A, lam, j)
        chosen.append(j)
        lambdas.append(lam)
    beta = mixture.lambdas_to_beta(lambdas, chosen, K, n_components=C)
    return Phase1Result(beta, accA, chosen, lambdas, judge.n_evals, judge.trace)


# ---- phase 2 --------------------------------------------------------------------------------

@dataclass
class Phase2Result:
    beta: np.ndarray
    val_acc: float
    mu: np.ndarray  # (K, C); 1 on the rows of ingredients phase 1 did not choose
    n_evals: int
    trace: list[tuple[int, float]] = field(default_factory=list)


def phase2(beta: np.ndarray, evaluate: Evaluate, cfg: SoupConfig, progress: Progress = None) -> Phase2Result:
    """Joint refinement of phase 1's beta over the chosen ingredients:
    beta'[j, c] = mu[j, c] beta[j, c] / P_c, mu in cfg.phase2.bounds, start 1. The caller keeps
    the result only if it beats phase 1 on val (and runs it only if cfg.phase2.enabled)."""
    check_settings(cfg)
    beta = mixture.validate(beta)
    rows = np.flatnonzero(beta.any(axis=1))  # the chosen ingredients; other rows stay 0
    K, C = beta.shape
    budget = len(rows) * C * cfg.phase2.evals_per_dim
    judge = _Judge(evaluate, 2, budget if len(rows) > 1 else 1, progress)
    judge.where = {"ingredient": None, "step": "mu"}

    def full_mu(mu_rows: np.ndarray) -> np.ndarray:
        mu = np.ones((K, C))
        mu[rows] = mu_rows
        return mu

    def beta_of(mu_rows):
        return mixture.mu_to_beta(beta, full_mu(mu_rows))

    if len(rows) == 1:  # one ingredient: every mu gives the same mixture
        acc = judge([beta])[0]
        return Phase2Result(beta, acc, np.ones((K, C)), judge.n_evals, judge.trace)
    low, high = cfg.phase2.bounds
    mu_best, acc = _search(judge, beta_of, np.ones((len(rows), C)), low, high, budget, cfg)
    return Phase2Result(beta_of(mu_best), acc, full_mu(mu_best), judge.n_evals, judge.trace)
