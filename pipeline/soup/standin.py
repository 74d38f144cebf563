"""A deterministic stand-in for the val forward pass, for tests and bench/search_scaling.py: the
accuracy of a mixture is a fixed function of beta, shaped so that phase 1 makes decisions like
the reference's log (most candidates stop at the short-circuit, about a third run a first pass
and are rejected, a few join), and quantised to a val set of ``n_images`` images.

    acc(beta) = mean_c [ sum_j beta[j,c] q_j + sum_j g[j,c] beta[j,c] (1 - beta[j,c]) ]

q_j is ingredient j's own accuracy (the one-hot mixture scores exactly q_j); g[j,c] >= 0 is
what j adds to a mixture in component c: ~0 for most, enough to survive the short-circuit
for some, enough to join for a few. ``StandInHost`` serves it like a mixture evaluator actor,
with a fixed latency per evaluation."""
from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from ..evaluate.mixture import Score, Threshold
from .dispatch import simulated_score

# fractions of candidates per kind (the reference: ~60 % short-circuited, ~8 % joining)
KINDS = {"weak": 0.60, "close": 0.32, "good": 0.08}


class ReferenceLike:
    """acc(beta) for K ingredients x C components, from ``seed``."""

    def __init__(self, K: int = 72, C: int = 3, seed: int = 0, n_images: int = 26_000):
        rng = np.random.default_rng(seed)
        self.K, self.C, self.n_images = K, C, n_images
        # own accuracies: best first after sorting, close together like finetunes of one model
        q = np.sort(0.80 - np.abs(rng.normal(0.0, 0.002, K)))[::-1]
        kinds = rng.choice(list(KINDS), size=K, p=list(KINDS.values()))
        kinds[0] = "close"  # the soup starts from the best: it mixes
        strength = {"weak": (-0.08, -0.04), "close": (-0.002, 0.003), "good": (0.012, 0.02)}
        g = np.zeros((K, C))
        for j, kind in enumerate(kinds):
            lo, hi = strength[kind]
            g[j] = rng.uniform(lo, hi) * rng.uniform(0.6, 1.4, C)
        self.q, self.g, self.kinds = q, g, list(kinds)

    @property
    def val_accs(self) -> list[float]:
        """Each ingredient's val accuracy (its one-hot mixture's)."""
        return [self(np.eye(self.K)[:, [j] * self.C]) for j in range(self.K)]

    def raw(self, beta: np.ndarray) -> float:
        beta = np.asarray(beta, dtype=np.float64)
        per_component = beta.T @ self.q + (self.g * beta * (1.0 - beta)).sum(axis=0)
        return float(per_component.mean())

    def __call__(self, beta: np.ndarray) -> float:
        return round(min(max(self.raw(beta), 0.0), 1.0) * self.n_images) / self.n_images

    def evaluate(self, betas: Sequence[np.ndarray]) -> list[float]:
        return [self(b) for b in betas]

    def score(self, betas: Sequence[np.ndarray], thresholds: Sequence[Threshold | None] | None = None) -> list[Score]:
        thresholds = list(thresholds) if thresholds is not None else [None] * len(betas)
        return [simulated_score(self(b), self.n_images, t) for b, t in zip(betas, thresholds)]


class StandInHost:
    """A mixture evaluator actor's interface (info, evaluate, score) over ``ReferenceLike``,
    sleeping ``latency_s`` per evaluation as a val pass on a GPU would take."""

    def __init__(self, K: int, C: int, seed: int, latency_s: float, n_images: int = 26_000,
                 die_after: int | None = None):
        self.function = ReferenceLike(K, C, seed, n_images)
        self.latency_s = latency_s
        self.die_after = die_after  # tests: the process exits on this evaluation, as a lost node
        self.scored = 0

    def info(self) -> dict:
        return {"ingredient_ids": [f"ing{j:02d}" for j in range(self.function.K)],
                "component_names": [f"c{c}" for c in range(self.function.C)], "n_images": self.function.n_images}

    def evaluate(self, betas) -> list[float]:
        time.sleep(self.latency_s * len(betas))
        return self.function.evaluate(betas)

    def score(self, betas, thresholds=None) -> list[Score]:
        self.scored += 1
        if self.die_after is not None and self.scored > self.die_after:
            os._exit(1)
        t0 = time.perf_counter()
        time.sleep(self.latency_s * len(betas))
        scores = self.function.score(betas, thresholds)
        each = (time.perf_counter() - t0) / len(betas)
        return [Score(s.accuracy, s.images, each) for s in scores]
