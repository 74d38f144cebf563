"""The mixture contract, below the soup and the evaluator alike (neither imports the other for
a name): what a mixture is and its one test, so what the soup accepts is what is scored —
``beta[j, c]`` (ingredient j, component c) a finite float64 matrix with columns >= 0 summing
to 1 —; which tensor belongs to which component; the threshold a search asks a mixture to
pass and the ``Score`` an evaluator answers; val cut into shards and their counts combined;
and the evaluator protocols every search accepts (``Evaluate``, ``AsyncEvaluator``). Plain
numpy: no torch, no Ray."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import UserError

# a column may miss 1 by this much (products of a few dozen lambdas are exact to ~1e-15)
COLUMN_SUM_TOLERANCE = 1e-9


class MixtureError(UserError, ValueError):
    """A beta matrix (or mixing factors) that is not a valid mixture; the message says why."""


class EvaluatorInputError(UserError, ValueError):
    """Ingredients, components, val tensors or a mixture that do not fit the model."""


def validate(beta, *, shape: tuple[int, int] | None = None, index: int | None = None,
             component_names: Sequence[str] | None = None,
             error: type[Exception] = MixtureError) -> np.ndarray:
    """Check a mixture and return it as a C-contiguous float64 array. ``shape`` is the
    (ingredients, components) it must have; ``index`` (its place in a batch) and
    ``component_names`` make the message name the culprit; ``error`` is the class raised."""
    where = "mixture" if index is None else f"mixture {index}"
    b = np.ascontiguousarray(beta, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] < 1 or b.shape[1] < 1:
        raise error(f"{where} must be a (ingredients, components) matrix, got shape {b.shape}")
    if shape is not None and b.shape != tuple(shape):
        raise error(f"{where}: shape {b.shape}, expected {tuple(shape)} = (ingredients, components)")
    if not np.isfinite(b).all():
        raise error(f"{where} holds NaN or inf")
    if (b < 0).any():
        j, c = np.argwhere(b < 0)[0]
        raise error(f"{where}: weight beta[{j}, {c}] = {b[j, c]} is negative (weights must be >= 0)")
    sums = b.sum(axis=0)
    bad = np.flatnonzero(np.abs(sums - 1.0) > COLUMN_SUM_TOLERANCE)
    if bad.size:
        c = int(bad[0])
        name = "" if component_names is None else f" ({component_names[c]!r})"
        raise error(f"{where}: column {c}{name} sums to {sums[c]:.12g}, not 1")
    return b


def as_bytes(beta) -> bytes:
    """A mixture as float64 C-order bytes: how the pool ships one mixture to its S shard tasks,
    serialised once (``from_bytes`` is exact: the same bits come back)."""
    return np.ascontiguousarray(beta, dtype=np.float64).tobytes()


def from_bytes(data: bytes, shape: tuple[int, int], *, error: type[Exception] = MixtureError) -> np.ndarray:
    """The (ingredients, components) mixture ``as_bytes`` made, for a receiver that knows its shape."""
    k, c = shape
    if len(data) != k * c * 8:
        raise error(f"mixture of {len(data)} bytes, expected {k} x {c} float64 = {k * c * 8} bytes")
    return np.frombuffer(data, dtype=np.float64).reshape(k, c)


def mixture_key(beta) -> str:
    """Journal key: sha256 of the shape and the float64 C-contiguous bytes."""
    b = np.ascontiguousarray(beta, dtype=np.float64) + 0.0  # + 0.0 turns -0.0 into 0.0
    h = hashlib.sha256(f"{b.shape[0]}x{b.shape[1]}:".encode())
    h.update(b.tobytes())
    return h.hexdigest()


def check_accuracies(accs, n: int, source: str = "evaluate") -> list[float]:
    """An evaluator's answer: n finite accuracies in [0, 1], in order."""
    accs = [float(a) for a in accs]
    if len(accs) != n:
        raise ValueError(f"{source} returned {len(accs)} accuracies for {n} mixtures")
    for i, a in enumerate(accs):
        if not (math.isfinite(a) and 0.0 <= a <= 1.0):
            raise ValueError(f"{source} returned accuracy {a!r} for mixture {i}: expected a number in [0, 1]")
    return accs


# ---- which tensor belongs to which component (beta's columns) ------------------------------

def component_tensors(component) -> tuple[str, ...]:
    """The tensors a component mixes: its parameters, then the floating buffers it may list
    (BatchNorm statistics; ``model.components.Component``)."""
    return tuple(component.params) + tuple(getattr(component, "buffers", ()))


def tensor_owners(components: Sequence, known: Collection[str], *, unknown: str,
                  error: type[Exception] = MixtureError) -> dict[str, int]:
    """{tensor name: its component's column}, in component order: every tensor in at most one
    component, each one of ``known``; ``unknown`` ends the message naming one that is not
    (``"which ingredient 0 does not have"``), ``error`` is the class raised."""
    owner: dict[str, int] = {}
    for c, comp in enumerate(components):
        for name in component_tensors(comp):
            if name not in known:
                raise error(f"component {comp.name!r} names {name!r}, {unknown}")
            if name in owner:
                raise error(f"tensor {name!r} is in components {components[owner[name]].name!r} and {comp.name!r}")
            owner[name] = c
    return owner


# ---- val cut into shards --------------------------------------------------------------------

def shard_bounds(n_images: int, batch_size: int, n_shards: int) -> list[tuple[int, int]]:
    """Val cut into ``n_shards`` contiguous shards of whole batches (fewer when there are fewer
    batches): [start, stop) image ranges. Batch b is always images [b * batch_size, ...), so
    the batches, and so every per-image prediction, are the same for any number of shards."""
    if n_images < 1 or batch_size < 1 or n_shards < 1:
        raise EvaluatorInputError(f"shards need n_images, batch_size and n_shards >= 1, "
                                  f"got {n_images}, {batch_size}, {n_shards}")
    n_batches = -(-n_images // batch_size)
    s = min(n_shards, n_batches)
    cuts = [i * n_batches // s * batch_size for i in range(s)] + [n_images]
    return [(min(a, n_images), min(b, n_images)) for a, b in zip(cuts, cuts[1:])]


@dataclass(frozen=True)
class ShardCount:
    """One shard of one evaluation: ``correct`` of ``images`` scored; ``stopped`` when its misses
    alone exceeded the misses the threshold allows (the whole evaluation then fails it)."""
    correct: int
    images: int
    stopped: bool = False
    seconds: float = 0.0


# ---- threshold tests and scores -------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    """A search's accept test on a mixture's val accuracy: ``acc >= value`` (``acc > value`` when
    ``strict``). Phase 1's short-circuit is ``Threshold(tau * accA)``, greedy soup's
    ``Threshold(best, strict=True)``: the very float comparisons of the sequential code."""
    value: float
    strict: bool = False

    def passes(self, accuracy: float) -> bool:
        return accuracy > self.value if self.strict else accuracy >= self.value

    def needed(self, n: int) -> int:
        """The fewest correct images out of n that pass, judged on ``correct / n`` exactly as
        the accuracy is computed (n + 1 when none pass): c / n is monotone in c, so this is
        the boundary of the float comparison itself, not an approximation of it."""
        c = min(max(int(self.value * n), 0), n)
        while c > 0 and self.passes((c - 1) / n):
            c -= 1
        while c <= n and not self.passes(c / n):
            c += 1
        return c


@dataclass(frozen=True)
class Score:
    """One evaluation: the val accuracy, or None when a threshold test stopped early because
    the threshold could no longer be reached; ``images`` = images actually scored."""
    accuracy: float | None
    images: int
    seconds: float = 0.0

    @property
    def below(self) -> bool:
        return self.accuracy is None


def misses_allowed(threshold: Threshold | None, n: int) -> int | None:
    """The most images of n a mixture may miss and still pass ``threshold`` (negative: none can
    pass; None: no threshold). A shard whose own misses exceed it settles the evaluation."""
    return None if threshold is None else n - threshold.needed(n)


def combine(counts: Sequence[ShardCount], n: int, threshold: Threshold | None) -> Score:
    """One evaluation's Score from its shards' counts: below the threshold when a shard stopped
    (its misses alone exceed what the threshold allows, so no other shard is needed) or when
    the summed misses do; else the summed correct / n. ``images`` counts the images the given
    shards scored, so after an early stop it depends on how val was sharded."""
    images = sum(c.images for c in counts)
    seconds = sum(c.seconds for c in counts)
    allowed = misses_allowed(threshold, n)
    if any(c.stopped for c in counts):
        return Score(None, images, seconds)
    if sum(c.images for c in counts) != n:
        raise ValueError(f"the shards scored {images} of {n} images and none stopped")
    correct = sum(c.correct for c in counts)
    if allowed is not None and n - correct > allowed:
        return Score(None, images, seconds)
    return Score(correct / n, images, seconds)


# ---- the evaluator protocols ----------------------------------------------------------------

class Evaluate(Protocol):
    """The plain evaluator: the val accuracy of each mixture, in order, in one call (a batch)."""

    def __call__(self, betas: Sequence[np.ndarray]) -> list[float]: ...


class AsyncEvaluator(Protocol):
    """An evaluator of E workers: ``submit`` a mixture (maybe with the threshold it must pass) for
    a ticket, ``wait`` for some answers. The Ray pool (soup/pool.py) is one; the tests' and
    benches' simulator (bench/standin.py) another."""

    parallel: bool
    size: int

    def free(self) -> int: ...

    def submit(self, beta: np.ndarray, threshold: Threshold | None = None) -> int: ...

    def wait(self) -> list[tuple[int, Score]]: ...
