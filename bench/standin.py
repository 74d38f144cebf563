"""Stand-ins for the val forward pass, for tests and bench/search_scaling.py (test scaffolding:
not part of the pipeline). ``SimulatedEvaluator`` plays a pool of E evaluators answering in a
seeded random order; ``ReferenceLike`` is a deterministic accuracy of a mixture is a fixed function of beta, shaped so that phase 1 makes decisions like
the reference's log (most candidates stop at the short-circuit, about a third run a first pass
and are rejected, a few join), and quantised to a val set of ``n_images`` images.

    acc(beta) = mean_c [ sum_j beta[j,c] q_j + sum_j g[j,c] beta[j,c] (1 - beta[j,c]) ]

q_j is ingredient j's own accuracy (the one-hot mixture scores exactly q_j); g[j,c] >= 0 is
what j adds to a mixture in component c: ~0 for most, enough to survive the short-circuit
for some, enough to join for a few. ``StandInHost`` serves it like a mixture evaluator actor,
with a fixed latency per evaluation.

Import it with bench/ on sys.path (``from standin import ...``). It is not installed with the
package, so it asks Ray to ship its classes to workers by value (cloudpickle), wherever they run."""
from __future__ import annotations

import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import ray.cloudpickle

from pipeline.mixture import Score, ShardCount, Threshold, from_bytes

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---- a simulated pool of evaluators ---------------------------------------------------------

class SimulatedEvaluator:
    """A deterministic stand-in for a pool of E evaluators (tests): accuracy = ``accuracy(beta)``
    read as correct / ``n_images``; answers come back in a seeded random order, a few at a time;
    ``lose_after`` evaluations in, one evaluator is lost and its evaluation re-queued, as the
    Ray pool does. Threshold tests stop early as the real evaluator would (misses spread evenly)."""

    parallel = True

    def __init__(self, accuracy: Callable[[np.ndarray], float], n_evaluators: int, *, seed: int = 0,
                 n_images: int = 1000, lose_after: int | None = None):
        self.accuracy, self.size, self.n_images = accuracy, n_evaluators, n_images
        self.rng = random.Random(seed)
        self.lose_after = lose_after
        self.alive = n_evaluators
        self._queue: list[tuple[int, np.ndarray, Threshold | None]] = []
        self._running: list[tuple[int, np.ndarray, Threshold | None]] = []
        self._tickets = itertools.count()
        self.completed = 0
        self.max_running = 0

    def free(self) -> int:
        return self.alive - len(self._running) - len(self._queue)

    def submit(self, beta, threshold=None, priority: int = 0) -> int:
        ticket = next(self._tickets)
        self._queue.append((ticket, np.array(beta), threshold))
        self._start()
        return ticket

    def _start(self) -> None:
        while self._queue and len(self._running) < self.alive:
            self._running.append(self._queue.pop(0))
        self.max_running = max(self.max_running, len(self._running))

    def score(self, beta, threshold) -> Score:
        return simulated_score(self.accuracy(beta), self.n_images, threshold)

    def wait(self) -> list[tuple[int, Score]]:
        if not self._running:
            raise RuntimeError("wait() with nothing submitted")
        if self.lose_after is not None and self.completed >= self.lose_after and self.alive > 1:
            self.lose_after = None
            self.alive -= 1
            lost = self._running.pop(self.rng.randrange(len(self._running)))
            self._queue.insert(0, lost)  # its evaluation goes to another evaluator
            self._start()
        self.rng.shuffle(self._running)
        n = self.rng.randint(1, len(self._running))
        done, self._running = self._running[:n], self._running[n:]
        self.completed += len(done)
        self._start()
        return [(ticket, self.score(beta, threshold)) for ticket, beta, threshold in done]


def simulated_score(accuracy: float, n_images: int, threshold: Threshold | None) -> Score:
    """The Score a chunked evaluator gives for an accuracy of correct / n_images (misses spread
    evenly over the images): below the threshold after the images that make it unreachable."""
    correct = round(accuracy * n_images)
    if threshold is None:
        return Score(correct / n_images, n_images)
    needed = threshold.needed(n_images)
    if correct >= needed:
        return Score(correct / n_images, n_images)
    misses_allowed = n_images - needed  # stop at the first miss beyond these
    misses = n_images - correct
    images = n_images if misses == 0 else min(n_images, int(np.ceil((misses_allowed + 1) * n_images / misses)))
    return Score(None, images)


# ---- an accuracy of beta that decides like the reference's log ------------------------------

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


def shard_count(accuracy: float, n_images: int, start: int, stop: int, allowed: int | None) -> ShardCount:
    """A shard's count for an accuracy of correct / n_images with the misses spread evenly over
    the images (image i is the m-th miss when floor(M i / n) steps): stopped at the image where
    the shard's own misses exceed ``allowed``, as the real evaluator stops at a batch."""
    misses = n_images - round(accuracy * n_images)

    def missed(i: int) -> int:  # misses among images [0, i)
        return misses * i // n_images

    if allowed is not None:
        if allowed < 0:
            return ShardCount(0, 0, True)
        if missed(stop) - missed(start) > allowed:
            # the first image at which the shard's misses exceed allowed
            lo, hi = start + 1, stop
            while lo < hi:
                mid = (lo + hi) // 2
                if missed(mid) - missed(start) > allowed:
                    hi = mid
                else:
                    lo = mid + 1
            images = lo - start
            return ShardCount(images - (missed(lo) - missed(start)), images, True)
    return ShardCount((stop - start) - (missed(stop) - missed(start)), stop - start)


class StandInHost:
    """A mixture evaluator actor's interface (info, evaluate, score, score_shard) over
    ``ReferenceLike``, sleeping ``latency_s`` per evaluation (a shard task: ``fixed_s`` plus
    ``per_image_s`` per image scored) as a val pass on a GPU would take."""

    def __init__(self, K: int, C: int, seed: int, latency_s: float, n_images: int = 26_000,
                 die_after: int | None = None, batch_size: int = 256, fixed_s: float | None = None,
                 per_image_s: float | None = None):
        self.function = ReferenceLike(K, C, seed, n_images)
        self.latency_s = latency_s
        self.die_after = die_after  # tests: the process exits on this evaluation, as a lost node
        self.scored = 0
        self.batch_size = batch_size
        # a shard's time: fixed (fusing, launching) + per image; by default all of it per image
        self.fixed_s = 0.0 if fixed_s is None else fixed_s
        self.per_image_s = (latency_s - self.fixed_s) / n_images if per_image_s is None else per_image_s

    def info(self) -> dict:
        return {"ingredient_ids": [f"ing{j:02d}" for j in range(self.function.K)],
                "component_names": [f"c{c}" for c in range(self.function.C)], "n_images": self.function.n_images,
                "batch_size": self.batch_size}

    def score_shard(self, beta, start: int, stop: int, allowed: int | None = None) -> ShardCount:
        if isinstance(beta, bytes):  # as the pool sends it (pipeline.mixture.as_bytes)
            beta = from_bytes(beta, (self.function.K, self.function.C))
        self.scored += 1
        if self.die_after is not None and self.scored > self.die_after:
            os._exit(1)
        count = shard_count(self.function(beta), self.function.n_images, start, stop, allowed)
        seconds = self.fixed_s + self.per_image_s * count.images
        time.sleep(seconds)
        return ShardCount(count.correct, count.images, count.stopped, seconds)

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
