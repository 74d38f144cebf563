"""The evaluation journal: every evaluated (mixture, val accuracy), kept under a URI so a
crashed or repeated search replays its evaluations instead of redoing them.

Layout: ``<root>/<sha256(header)[:16]>/header.json`` and ``part-000001.jsonl``, ... — one part
per evaluated batch, because S3 cannot append. The header names what an accuracy depends on
(ingredient hashes, val split, config): a different header is a different directory, so
nothing is ever reused across headers. See docs/algorithm.md."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence

import numpy as np

from .. import storage
from .mixture import check_accuracies, mixture_key, validate

PART = re.compile(r"^part-(\d{6})\.jsonl$")


def header_key(header: dict) -> str:
    try:
        blob = json.dumps(header, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"journal header must be JSON-serialisable: {e}") from None
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _record(beta: np.ndarray, acc: float) -> dict:
    """One journal line; only non-zero rows are written (phase 1 mixes few of K ingredients)."""
    rows = np.flatnonzero(beta.any(axis=1))
    return {"key": mixture_key(beta), "shape": list(beta.shape), "rows": rows.tolist(),
            "values": beta[rows].tolist(), "acc": acc}


def _beta_of(record: dict) -> np.ndarray:
    beta = np.zeros(record["shape"])
    beta[record["rows"]] = record["values"]
    return beta


def _read_part(uri: str) -> list[dict]:
    """The records of one part file, each checked against its own key."""
    try:
        records = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
        for r in records:
            if mixture_key(_beta_of(r)) != r["key"] or not isinstance(r["acc"], float):
                raise ValueError(f"record {r['key'][:12]}... does not match its mixture")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise storage.StorageError(f"journal part {uri!r} is damaged: {e}") from None
    return records


class Journal:
    """Evaluated mixtures of one header. Open with ``Journal.open(root_uri, header)``."""

    def __init__(self, uri: str, header: dict, accs: dict[str, float], last_part: int):
        self.uri, self.header = uri, header
        self._accs = accs
        self._last_part = last_part

    @classmethod
    def open(cls, root_uri: str, header: dict) -> "Journal":
        uri = storage.join(root_uri, header_key(header))
        header_uri = storage.join(uri, "header.json")
        normalised = json.loads(json.dumps(header, sort_keys=True))
        if storage.exists(header_uri):
            if storage.read_json(header_uri) != normalised:
                raise storage.StorageError(f"{header_uri!r} holds another header than its directory name says")
        else:
            storage.write_json(header_uri, normalised)
        accs: dict[str, float] = {}
        last = 0
        for name in storage.listdir(uri):
            m = PART.match(name)
            if not m:
                continue  # header.json, or a temporary file a crash left behind
            last = max(last, int(m[1]))
            for r in _read_part(storage.join(uri, name)):
                accs.setdefault(r["key"], r["acc"])  # first answer wins, as in the run that wrote it
        return cls(uri, normalised, accs, last)

    def __len__(self) -> int:
        return len(self._accs)

    def get(self, key: str) -> float | None:
        return self._accs.get(key)

    def append(self, betas: Sequence[np.ndarray], accs: Sequence[float]) -> None:
        """Write one part file holding these evaluations."""
        if not betas:
            return
        lines = [json.dumps(_record(validate(b), float(a))) for b, a in zip(betas, accs, strict=True)]
        self._last_part += 1
        storage.write_bytes(storage.join(self.uri, f"part-{self._last_part:06d}.jsonl"),
                            ("\n".join(lines) + "\n").encode())
        for line in lines:
            r = json.loads(line)
            self._accs.setdefault(r["key"], r["acc"])


class JournaledEvaluator:
    """``evaluate`` with a memory: mixtures in the journal are answered from it, the misses
    are evaluated in one batch call and journaled (one part file per call)."""

    def __init__(self, evaluate: Callable[[list[np.ndarray]], list[float]], journal: Journal):
        self.evaluate, self.journal = evaluate, journal
        self.hits = 0
        self.misses = 0

    def __call__(self, mixtures: list[np.ndarray]) -> list[float]:
        betas = [validate(b) for b in mixtures]
        keys = [mixture_key(b) for b in betas]
        missing = {k: b for k, b in zip(keys, betas) if self.journal.get(k) is None}
        if missing:
            accs = check_accuracies(self.evaluate(list(missing.values())), len(missing))
            self.journal.append(list(missing.values()), accs)
        self.misses += len(missing)
        self.hits += len(betas) - len(missing)
        return [self.journal.get(k) for k in keys]
