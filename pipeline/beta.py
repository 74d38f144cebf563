"""The one test of a mixture, for the soup and the evaluator alike, so what the soup accepts is
what is scored: ``beta[j, c]`` (ingredient j, component c) a finite float64 matrix with columns
>= 0 summing to 1."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import UserError

# a column may miss 1 by this much (products of a few dozen lambdas are exact to ~1e-15)
COLUMN_SUM_TOLERANCE = 1e-9


class MixtureError(UserError, ValueError):
    """A beta matrix (or mixing factors) that is not a valid mixture; the message says why."""


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
