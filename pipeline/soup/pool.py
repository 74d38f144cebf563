"""The soup's evaluators on Ray: a pool of E mixture evaluator actors, used two ways.
Synchronously, ``pool(betas) -> accuracies``: one list is spread over the actors and gathered
back in list order. Asynchronously (the speculative phase 1, pipeline/soup/dispatch.py):
``submit(beta, threshold) -> ticket``, ``free()``, ``wait() -> [(ticket, Score)]``.

E and the order in which actors finish never change a result: every actor mixes the same
ingredients with a pinned torch thread count, and answers are placed by their index in the
list. On the asynchronous side one evaluation is cut into S shard tasks of whole val batches
(``soup.val_shards``), each run by whichever actor is idle; their integer counts are summed
(``mixture.combine``), so S and E never change a prediction either. Queued shard
tasks run in priority order (the dispatcher gives the sequential search's next evaluation the
lowest number), a shard of a lost actor reruns on another, and once one shard settles a
threshold test below, the evaluation's other shards are dropped. The number of candidates
per call (the core's W, ``soup.num_workers``) is the search's business."""
from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import Config
from ..metrics import RUN_ENV, current_run
from ..errors import UserError
from ..mixture import ShardCount, Threshold, as_bytes, combine, misses_allowed, shard_bounds

# how long to wait for the first evaluator to start (an autoscaling cluster adds a node first)
START_TIMEOUT_S = 900.0

OnBatch = Callable[[int, float | None, float], None]


class EvaluatorPoolError(UserError, RuntimeError):
    """The pool has no evaluator to run on: none started (resources the cluster lacks), or all died."""


@dataclass
class _Evaluation:
    """One submitted mixture, cut into shard tasks; settled once every shard counted or one stopped."""
    ticket: int
    beta: bytes  # float64 bytes (mixture.as_bytes): serialised once for all its shard tasks
    threshold: Threshold | None
    allowed: int | None
    counts: dict = field(default_factory=dict)  # shard index -> ShardCount
    settled: bool = False
    outstanding: int = 0  # shard tasks queued or running


class EvaluatorPool:
    """``pool(betas) -> accuracies`` over Ray actors answering ``evaluate.remote([beta])``.

    Actors join as soon as they are ready (the first call waits for at least one), each idle
    actor is handed the next mixture of the list, and answers are stored by index; a mixture
    whose actor died is handed to another. Counters
    (``evaluations``, ``best_val``, ``seconds``) and the ``on_batch(n, best_val, seconds)`` hooks
    are updated after every call, one call being one batch."""

    def __init__(self, actors: Sequence, on_batch: Sequence[OnBatch] = (), start_timeout_s: float = START_TIMEOUT_S,
                 on_admit: Sequence[Callable] = (), n_shards: int = 1):
        import ray

        if not actors:
            raise ValueError("EvaluatorPool needs at least one actor")
        self._ray = ray
        self._all = list(actors)
        self._starting = {a.info.remote(): a for a in self._all}  # info() answers once built
        self._init_state(on_batch, start_timeout_s, n_shards, on_admit)

    def _init_state(self, on_batch: Sequence[OnBatch], start_timeout_s: float, n_shards: int,
                    on_admit: Sequence[Callable] = ()) -> None:
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1, got {n_shards}")
        self.n_shards = n_shards
        self._bounds: list[tuple[int, int]] | None = None  # from the first actor's n_images, batch_size
        self._ready: list = []
        self.infos: list[dict] = []  # each started actor's info(), in start order
        self.start_timeout_s = start_timeout_s
        self.on_batch: list[OnBatch] = list(on_batch)
        self.on_admit = list(on_admit)  # (actor, info) -> None, before it takes work: the probe check
        self.evaluations = 0
        self.best_val: float | None = None
        self.seconds = 0.0
        # the asynchronous side: a heap of (priority, ticket, shard) tasks, refs in flight, idle actors
        self._tickets = itertools.count()
        self._queue: list[tuple[int, int, int]] = []
        self._evaluations: dict[int, _Evaluation] = {}
        self._running: dict = {}
        self._idle: list = []
        self.shards_run = 0  # shard tasks that came back (dropped ones included)
        self._served: dict[int, set[int]] = {}  # id(actor) -> shards it holds

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

    # -- asynchronous: one evaluation = S shard tasks, any number in flight --

    parallel = True
    prioritised = True

    def bounds(self) -> list[tuple[int, int]]:
        """The val shards every evaluation is cut into (whole batches; fewer when val is small)."""
        if self._bounds is None:
            self._admit_ready()
            info = self.infos[0]
            self._bounds = shard_bounds(int(info["n_images"]), int(info.get("batch_size", info["n_images"])),
                                        self.n_shards)
        return self._bounds

    def _queued(self) -> int:
        return sum(1 for _, ticket, _ in self._queue if not self._evaluations[ticket].settled)

    def free(self) -> int:
        """Actors that would start a submitted shard task right away (started ones join here)."""
        self._admit_ready(0 if self._ready else 1)
        return len(self._idle) - self._queued()

    def submit(self, beta, threshold=None, priority: int = 0) -> int:
        """Queue one evaluation as S shard tasks; lower ``priority`` runs first (ties: ticket order)."""
        ticket = next(self._tickets)
        bounds = self.bounds()
        n = bounds[-1][1]
        self._evaluations[ticket] = _Evaluation(ticket, as_bytes(beta), threshold,
                                                misses_allowed(threshold, n))
        self._evaluations[ticket].outstanding = len(bounds)
        for shard in range(len(bounds)):
            heapq.heappush(self._queue, (priority, ticket, shard))
        self._dispatch()
        return ticket

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            priority, ticket, shard = item = heapq.heappop(self._queue)
            evaluation = self._evaluations[ticket]
            if evaluation.settled:  # another shard already settled it below its threshold
                self._release(evaluation)
                continue
            # an actor that already holds this shard's images, if one is idle (else any: it loads them)
            actor = next((a for a in self._idle if shard in self._served.get(id(a), ())), self._idle[0])
            self._idle.remove(actor)
            self._served.setdefault(id(actor), set()).add(shard)
            start, stop = self._bounds[shard]
            self._running[self._launch(actor, evaluation.beta, start, stop, evaluation.allowed)] = (item, actor)

    def _launch(self, actor, beta: bytes, start: int, stop: int, allowed: int | None):
        return actor.score_shard.remote(beta, start, stop, allowed)

    def _finished(self) -> list[tuple[object, ShardCount | None]]:
        """At least one finished shard task: (ref, its count, or None when its actor died)."""
        from ray.exceptions import RayActorError

        done, _ = self._ray.wait(list(self._running), num_returns=1)
        rest = [r for r in self._running if r not in done]
        if rest:
            done += self._ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        try:
            return list(zip(done, self._ray.get(done)))  # one call for every finished task
        except RayActorError:  # some actor died: which one's shard came back empty, ref by ref
            pass
        out = []
        for ref in done:
            try:
                out.append((ref, self._ray.get(ref)))
            except RayActorError:
                out.append((ref, None))
        return out

    def wait(self) -> list:
        """Block until at least one submitted evaluation is settled: [(ticket, Score)]. A shard
        whose actor died goes back to the queue, at its priority, for another actor."""
        out = []
        while not out:
            if not self._running:
                if not self._queued():
                    raise RuntimeError("wait() with nothing submitted")
                self._replace_lost()  # every actor died: one still starting, or an error
                self._idle = list(self._ready)  # nothing runs, so every live actor is idle
                self._dispatch()
                continue
            for ref, count in self._finished():
                item, actor = self._running.pop(ref)
                if count is None:
                    self._lose(actor)
                    heapq.heappush(self._queue, item)
                    continue
                self._idle.append(actor)
                self.shards_run += 1
                _, ticket, shard = item
                evaluation = self._evaluations[ticket]
                if not evaluation.settled:  # else settled below by another shard: this count is moot
                    evaluation.counts[shard] = count
                    if count.stopped or len(evaluation.counts) == len(self._bounds):
                        evaluation.settled = True
                        score = combine(list(evaluation.counts.values()), self._bounds[-1][1],
                                        evaluation.threshold)
                        out.append((ticket, score))
                        self._count(score)
                self._release(evaluation)
            self._admit_ready(0)
            self._dispatch()
        return out

    def _release(self, evaluation: _Evaluation) -> None:
        """One of its shard tasks is done with (run, or skipped once settled)."""
        evaluation.outstanding -= 1
        if evaluation.settled and evaluation.outstanding == 0:
            del self._evaluations[evaluation.ticket]

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


class InProcessPool(EvaluatorPool):
    """The same scheduling over evaluators in this process (anything with ``info()`` and
    ``score_shard``, e.g. a MixtureEvaluator's host): each ``wait`` finishes a seeded random
    subset of the running shard tasks, so tests drive shuffled finish orders and lost evaluators
    (``lose_after``: that many shard tasks in, the evaluator running the next one dies mid-shard
    and its shard reruns elsewhere) through the code the Ray pool runs."""

    def __init__(self, hosts: Sequence, n_shards: int = 1, *, seed: int = 0, lose_after: int | None = None,
                 on_batch: Sequence[OnBatch] = ()):
        if not hosts:
            raise ValueError("InProcessPool needs at least one evaluator")
        self._all = list(hosts)
        self._starting = {}
        self._init_state(on_batch, 0.0, n_shards)
        self.infos = [h.info() if hasattr(h, "info") else {"n_images": h.n_images, "batch_size": h.batch_size}
                      for h in self._all]
        self._ready, self._idle = list(self._all), list(self._all)
        self.rng = random.Random(seed)
        self.lose_after = lose_after
        self.lost: list = []
        self._refs = itertools.count()

    def _launch(self, actor, beta, start, stop, allowed):
        ref = next(self._refs)
        self._calls = getattr(self, "_calls", {})
        self._calls[ref] = (actor, beta, start, stop, allowed)
        return ref

    def _finished(self):
        refs = list(self._running)
        self.rng.shuffle(refs)
        out = []
        for ref in refs[:self.rng.randint(1, len(refs))]:
            actor, beta, start, stop, allowed = self._calls.pop(ref)
            if self.lose_after is not None and self.shards_run >= self.lose_after and len(self._ready) > 1:
                self.lose_after = None
                self.lost.append(actor)
                out.append((ref, None))  # died mid-shard: nothing comes back
                continue
            out.append((ref, actor.score_shard(beta, start, stop, allowed)))
        return out

    def close(self) -> None:
        self._all, self._ready, self._idle = [], [], []


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
    """The Ray-backed ``evaluate`` for the soup: E actors behind one callable, each evaluation cut
    into ``soup.val_shards`` shard tasks, each actor checked to predict like the first on the
    probe mixtures (pipeline/soup/probe.py) as it joins."""
    from .probe import ProbeCheck

    pool = EvaluatorPool(start_evaluators(cfg, split_name, ingredient_ids, **kwargs), on_batch=on_batch,
                         n_shards=cfg.soup.val_shards)
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
    prioritised = True

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

    def submit(self, beta, threshold=None, priority: int = 0) -> int:
        return self.started().submit(beta, threshold, priority)

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
