"""The soup's evaluators on Ray: a pool of E mixture evaluator actors, used two ways.
Synchronously, ``pool(betas) -> accuracies``: one list is spread over the actors and gathered
back in list order. Asynchronously (the speculative phase 1, pipeline/soup/dispatch.py):
``submit(beta, threshold) -> ticket``, ``free()``, ``wait() -> [(ticket, Score)]``.

E and the order in which actors finish never change a result: every actor holds the same
ingredients and val tensors with a pinned torch thread count, each mixture is scored by
exactly one actor, and answers are placed by their index in the list. The number of
candidates per call (the core's W, ``soup.num_workers``) is the search's business."""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..config import Config
from ..metrics import RUN_ENV, current_run
from ..errors import UserError

# how long to wait for the first evaluator to start (an autoscaling cluster adds a node first)
START_TIMEOUT_S = 900.0

OnBatch = Callable[[int, float | None, float], None]


class EvaluatorPoolError(UserError, RuntimeError):
    """The pool has no evaluator to run on: none started (resources the cluster lacks), or all died."""


class EvaluatorPool:
    """``pool(betas) -> accuracies`` over Ray actors answering ``evaluate.remote([beta])``.

    Actors join as soon as they are ready (the first call waits for at least one), each idle
    actor is handed the next mixture of the list, and answers are stored by index; a mixture
    whose actor died is handed to another. Counters
    (``evaluations``, ``best_val``, ``seconds``) and the ``on_batch(n, best_val, seconds)`` hooks
    are updated after every call, one call being one batch."""

    def __init__(self, actors: Sequence, on_batch: Sequence[OnBatch] = (), start_timeout_s: float = START_TIMEOUT_S,
                 on_admit: Sequence[Callable] = ()):
        import ray

        if not actors:
            raise ValueError("EvaluatorPool needs at least one actor")
        self._ray = ray
        self._all = list(actors)
        self._starting = {a.info.remote(): a for a in self._all}  # info() answers once built
        self._ready: list = []
        self.infos: list[dict] = []  # each started actor's info(), in start order
        self.start_timeout_s = start_timeout_s
        self.on_batch: list[OnBatch] = list(on_batch)
        self.on_admit = list(on_admit)  # (actor, info) -> None, before it takes work: the probe check
        self.evaluations = 0
        self.best_val: float | None = None
        self.seconds = 0.0
        # the asynchronous side: queued (ticket, beta, threshold), refs in flight, idle actors
        self._tickets = itertools.count()
        self._queue: list[tuple] = []
        self._running: dict = {}
        self._idle: list = []

    @property
    def size(self) -> int:
        return len(self._all)

    @property
    def in_service(self) -> int:
        """Actors started and alive (as far as the pool has seen)."""
        return len(self._ready)

    def _admit_ready(self, at_least: int = 1) -> None:
        """Put every started actor into service, waiting (bounded) until ``at_least`` are."""
        if not self._starting:
            return
        refs = list(self._starting)
        short = at_least - len(self._ready)
        done, _ = self._ray.wait(refs, num_returns=short if short > 0 else len(refs),
                                 timeout=self.start_timeout_s if short > 0 else 0)
        if len(done) < short:
            raise EvaluatorPoolError(
                f"only {len(self._ready) + len(done)} of {self.size} mixture evaluators started within "
                f"{self.start_timeout_s:.0f}s: does the cluster have the resources of soup.evaluator_resources?")
        for ref in done:
            actor = self._starting.pop(ref)
            self.infos.append(self._ray.get(ref))  # raises the actor's construction error
            for admit in self.on_admit:
                admit(actor, self.infos[-1])
            self._ready.append(actor)
            self._idle.append(actor)

    def wait_ready(self, count: int = 1) -> dict:
        """Block until ``count`` actors (at most all) are in service; returns the first one's info()."""
        self._admit_ready(min(count, self.size))
        return self.infos[0]

    def _scatter_gather(self, betas: list[np.ndarray]) -> list[float]:
        """Hand each idle actor the next mixture; an actor that dies (its node lost) leaves the
        pool and its mixture goes to another, so only losing every actor stops the search."""
        from ray.exceptions import RayActorError

        results: list[float | None] = [None] * len(betas)
        todo = list(range(len(betas)))
        idle = list(self._ready)
        pending: dict = {}
        while todo or pending:
            if not idle and not pending:
                self._replace_lost()
                idle = list(self._ready)
            while idle and todo:
                actor, index = idle.pop(0), todo.pop(0)
                pending[actor.evaluate.remote([betas[index]])] = (index, actor)
            done, _ = self._ray.wait(list(pending), num_returns=1)
            for ref in done:
                index, actor = pending.pop(ref)
                try:
                    (results[index],) = self._ray.get(ref)
                except RayActorError:
                    self._lose(actor)
                    todo.insert(0, index)
                    continue
                idle.append(actor)
        return results  # type: ignore[return-value]

    def _replace_lost(self) -> None:
        """Every actor in service died: wait for one still starting, or give up."""
        if not self._starting:
            raise EvaluatorPoolError(f"all {self.size} mixture evaluators died; rerun the soup to resume "
                                      "from its memo")
        self._admit_ready()

    def __call__(self, betas: Sequence) -> list[float]:
        betas = [np.ascontiguousarray(b, dtype=np.float64) for b in betas]
        if not betas:
            return []
        self._admit_ready()
        t0 = time.perf_counter()
        accs = [float(a) for a in self._scatter_gather(betas)]
        seconds = time.perf_counter() - t0
        self.evaluations += len(accs)
        self.seconds += seconds
        finite = [a for a in accs if math.isfinite(a)]
        if finite:
            self.best_val = max(finite + ([] if self.best_val is None else [self.best_val]))
        for hook in self.on_batch:
            hook(len(accs), self.best_val, seconds)
        return accs

    # -- asynchronous: one mixture per actor call, any number in flight --

    parallel = True

    def free(self) -> int:
        """Actors that would start a submitted mixture right away (started ones join here)."""
        self._admit_ready(0 if self._ready else 1)
        return len(self._idle) - len(self._queue)

    def submit(self, beta, threshold=None) -> int:
        ticket = next(self._tickets)
        self._queue.append((ticket, np.ascontiguousarray(beta, dtype=np.float64), threshold))
        self._dispatch()
        return ticket

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            actor = self._idle.pop(0)
            ticket, beta, threshold = item = self._queue.pop(0)
            self._running[actor.score.remote([beta], [threshold])] = (item, actor)

    def wait(self) -> list:
        """Block until at least one submitted mixture is scored: [(ticket, Score)]. A mixture
        whose actor died goes back to the head of the queue for another actor."""
        from ray.exceptions import RayActorError

        out = []
        while not out:
            if not self._running:
                if not self._queue:
                    raise RuntimeError("wait() with nothing submitted")
                self._replace_lost()  # every actor died: one still starting, or an error
                self._idle = list(self._ready)  # nothing runs, so every live actor is idle
                self._dispatch()
                continue
            # everything finished by now, at least one
            done, _ = self._ray.wait(list(self._running), num_returns=1)
            rest = [r for r in self._running if r not in done]
            if rest:
                done += self._ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in done:
                item, actor = self._running.pop(ref)
                try:
                    (score,) = self._ray.get(ref)
                except RayActorError:
                    self._lose(actor)
                    self._queue.insert(0, item)
                    continue
                self._idle.append(actor)
                out.append((item[0], score))
                self._count(score)
            self._admit_ready(0)
            self._dispatch()
        return out

    def _lose(self, actor) -> None:
        if actor in self._ready:
            self._ready.remove(actor)
        if actor in self._idle:
            self._idle.remove(actor)

    def _count(self, score) -> None:
        self.evaluations += 1
        self.seconds += score.seconds
        if score.accuracy is not None and math.isfinite(score.accuracy):
            self.best_val = score.accuracy if self.best_val is None else max(self.best_val, score.accuracy)

    def close(self) -> None:
        """Stop every actor (their CPUs/GPUs go back to the cluster for the next step)."""
        for actor in self._all:
            self._ray.kill(actor)
        self._all, self._ready, self._starting, self._idle = [], [], {}, []

    def __enter__(self) -> "EvaluatorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_evaluators(cfg: Config, split_name: str, ingredient_ids: Sequence[str], *,
                     num_evaluators: int | None = None, actor_class=None, **actor_kwargs) -> list:
    """E mixture evaluator actors on ``split_name`` with soup.evaluator_resources each.
    ``actor_class`` defaults to the evaluate stage's MixtureEvaluatorActor."""
    if actor_class is None:
        from ..evaluate.actor import MixtureEvaluatorActor as actor_class  # noqa: N813
    res = cfg.soup.evaluator_resources
    n = num_evaluators or cfg.soup.num_evaluators
    # SPREAD: one evaluator per node first, so a lost node takes as few of them as possible
    options = {"num_cpus": res.cpu, "num_gpus": res.gpu, "scheduling_strategy": "SPREAD",
               # the command's run id, for the actor's metrics' `run` label
               "runtime_env": {"env_vars": {RUN_ENV: current_run()}}}
    return [actor_class.options(**options).remote(cfg, split_name, list(ingredient_ids), **actor_kwargs)
            for _ in range(n)]


def evaluator_pool(cfg: Config, split_name: str, ingredient_ids: Sequence[str], *,
                   on_batch: Sequence[OnBatch] = (), n_components: int | None = None, **kwargs) -> EvaluatorPool:
    """The Ray-backed ``evaluate`` for the soup: E actors behind one callable, each checked to
    predict like the first on the probe mixtures (pipeline/soup/probe.py) as it joins."""
    from .probe import ProbeCheck

    pool = EvaluatorPool(start_evaluators(cfg, split_name, ingredient_ids, **kwargs), on_batch=on_batch)
    if n_components is not None:
        pool.probe = ProbeCheck(len(ingredient_ids), n_components)
        pool.on_admit.append(pool.probe.admit)
    return pool


class LazyPool:
    """The evaluator pool, started when first needed: the soup stage starts it before it opens
    the memo, whose context holds the evaluators' probe fingerprint (pipeline/soup/probe.py).
    Synchronous ``pool(betas)`` and the asynchronous side the speculative phase 1 uses
    (``free``, ``submit``, ``wait``)."""

    parallel = True

    def __init__(self, cfg: Config, val: str, ids: list[str], component_names: list[str], metrics):
        self.cfg, self.val, self.ids, self.names, self.metrics = cfg, val, ids, component_names, metrics
        self.pool = None

    @property
    def size(self) -> int:
        return self.cfg.soup.num_evaluators

    def started(self):
        if self.pool is None:
            self.pool = evaluator_pool(self.cfg, self.val, self.ids, n_components=len(self.names))
            check_pool(self.pool.wait_ready(), self.ids, self.names)
        return self.pool

    def probe_fingerprint(self) -> str | None:
        """Starts the pool; the fingerprint of its evaluators' probe predictions (None for a
        pool without the probe check)."""
        probe = getattr(self.started(), "probe", None)
        return None if probe is None else probe.fingerprint

    def __call__(self, betas: list[np.ndarray]) -> list[float]:
        return self.started()(betas)

    def free(self) -> int:
        return self.started().free()

    def submit(self, beta, threshold=None) -> int:
        return self.started().submit(beta, threshold)

    def wait(self) -> list:
        return self.started().wait()

    @property
    def seconds(self) -> float:
        return self.pool.seconds if self.pool is not None else 0.0

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()  # the actors' CPUs/GPUs go to the scoring that follows


def check_pool(info: dict, ids: list[str], component_names: list[str]) -> None:
    """The actors' beta rows and columns must be the ones this stage names in the report."""
    if info["ingredient_ids"] != ids or info["component_names"] != component_names:
        raise RuntimeError(f"evaluator actors mix {info['ingredient_ids']} x {info['component_names']}, "
                           f"the soup stage expected {ids} x {component_names}")
