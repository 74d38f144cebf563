"""The search memo: every evaluated mixture's val accuracy, keyed by content, so that no
mixture is ever scored twice — not after a crash, not when a search setting changes (tau, the
optimizer, W, a budget, phase 2), not when ingredients are added.

A memo is one directory per *evaluation context* — what an accuracy depends on besides the
mixture: the val split's content and scoring, the model, the component layout and the
evaluator's precision: ``<root>/<context key>/context.json`` and ``part-000001.jsonl``, ... (one
part per evaluated batch, because S3 cannot append). Within it a mixture is keyed by what it
mixes: ``[[ingredient sha256, [weight per component]], ...]`` over its non-zero rows, in beta's
row order. Zero rows are dropped, so a mixture of the first 4 ingredients has the same key when
the registry holds 6. See docs/algorithm.md ("The search memo")."""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import numpy as np

from .. import storage
from ..keys import digest
from ..mixture import Threshold, check_accuracies, validate

PART = re.compile(r"^part-(\d{6})\.jsonl$")


def mixture_content(beta: np.ndarray, shas: Sequence[str]) -> list:
    """A mixture as what it mixes: (ingredient sha256, its weights) for each non-zero row."""
    rows = np.flatnonzero(beta.any(axis=1))
    return [[shas[j], [float(w) + 0.0 for w in beta[j]]] for j in rows]  # + 0.0: -0.0 -> 0.0


def content_key(content: list) -> str:
    return digest(content)


def _read_part(uri: str) -> list[dict]:
    """The records of one part file, each checked against its own key."""
    try:
        records = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
        for r in records:
            ok = isinstance(r.get("acc"), float) or (
                isinstance(r.get("failed"), list) and len(r["failed"]) == 2 and isinstance(r["failed"][0], float))
            if content_key(r["mixture"]) != r["key"] or not ok:
                raise ValueError(f"record {r['key'][:12]}... does not match its mixture")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise storage.StorageError(f"search memo part {uri!r} is damaged: {e}") from None
    return records


class Memo:
    """Evaluated mixtures of one evaluation context. Open with ``Memo.open(root_uri, context)``."""

    def __init__(self, uri: str, context: dict, accs: dict[str, float], last_part: int,
                 failed: dict[str, list[tuple[float, bool]]] | None = None):
        self.uri, self.context = uri, context
        self._accs = accs
        self._failed = failed or {}
        self._last_part = last_part

    @classmethod
    def open(cls, root_uri: str, context: dict) -> "Memo":
        uri = storage.join(root_uri, digest(context))
        context_uri = storage.join(uri, "context.json")
        normalised = json.loads(json.dumps(context, sort_keys=True))
        if storage.exists(context_uri):
            if storage.read_json(context_uri) != normalised:
                raise storage.StorageError(f"{context_uri!r} holds another context than its directory name says")
        else:
            storage.write_json(context_uri, normalised)
        accs: dict[str, float] = {}
        failed: dict[str, list[tuple[float, bool]]] = {}
        last = 0
        for name in storage.listdir(uri):
            m = PART.match(name)
            if not m:
                continue  # context.json, or a temporary file a crash left behind
            last = max(last, int(m[1]))
            for r in _read_part(storage.join(uri, name)):
                if "acc" in r:
                    accs.setdefault(r["key"], r["acc"])  # first answer wins, as in the run that wrote it
                else:
                    failed.setdefault(r["key"], []).append((r["failed"][0], bool(r["failed"][1])))
        return cls(uri, normalised, accs, last, failed)

    def __len__(self) -> int:
        return len(self._accs)

    def get(self, key: str) -> float | None:
        return self._accs.get(key)

    def failed(self, key: str) -> list[tuple[float, bool]]:
        """The threshold tests (value, strict) the mixture is known to fail (early-stopped)."""
        return self._failed.get(key, [])

    def append(self, contents: Sequence[list], accs: Sequence[float],
               failed: Sequence[tuple[list, tuple[float, bool]]] = ()) -> None:
        """Write one part file holding these evaluations: accuracies, and ``failed`` threshold
        tests as (mixture content, (threshold value, strict))."""
        if not contents and not failed:
            return
        records = [{"key": content_key(c), "mixture": c, "acc": float(a)} for c, a in zip(contents, accs, strict=True)]
        records += [{"key": content_key(c), "mixture": c, "failed": [float(v), bool(strict)]}
                    for c, (v, strict) in failed]
        self._last_part += 1
        storage.write_bytes(storage.join(self.uri, f"part-{self._last_part:06d}.jsonl"),
                            ("\n".join(json.dumps(r) for r in records) + "\n").encode())
        for r in records:
            if "acc" in r:
                self._accs.setdefault(r["key"], r["acc"])
            else:
                self._failed.setdefault(r["key"], []).append((r["failed"][0], r["failed"][1]))


class MemoEvaluator:
    """``evaluate`` with a memory: mixtures in the memo are answered from it, the misses are
    evaluated in one batch call and recorded (one part file per call). ``shas`` names beta's
    rows by content."""

    def __init__(self, evaluate: Callable[[list[np.ndarray]], list[float]], memo: Memo, shas: Sequence[str]):
        self.evaluate, self.memo, self.shas = evaluate, memo, list(shas)
        self.hits = 0
        self.misses = 0

    def key(self, beta: np.ndarray) -> str:
        return content_key(mixture_content(beta, self.shas))

    def __call__(self, mixtures: list[np.ndarray]) -> list[float]:
        betas = [validate(b) for b in mixtures]
        if any(b.shape[0] != len(self.shas) for b in betas):
            raise ValueError(f"mixtures must have {len(self.shas)} rows, one per ingredient")
        contents = [mixture_content(b, self.shas) for b in betas]
        keys = [content_key(c) for c in contents]
        missing = {k: (b, c) for k, b, c in zip(keys, betas, contents) if self.memo.get(k) is None}
        if missing:
            accs = check_accuracies(self.evaluate([b for b, _ in missing.values()]), len(missing))
            self.memo.append([c for _, c in missing.values()], accs)
        self.misses += len(missing)
        self.hits += len(betas) - len(missing)
        return [self.memo.get(k) for k in keys]


class ContentMemo:
    """The search memo as the Dispatcher's memo: mixtures keyed by content, with their accuracy
    or the threshold tests they failed (an early stop is a fact too: a rerun makes the same
    decision without scoring). Written in batches (one part file per ``FLUSH_EVERY`` answers,
    and at the end), not one small object per evaluation; a crash loses at most the last batch."""

    FLUSH_EVERY = 32

    def __init__(self, memo: Memo, shas: Sequence[str]):
        self.memo, self.shas = memo, list(shas)
        self.pending: dict[str, tuple[list, float]] = {}
        self.pending_failed: list[tuple[str, list, tuple[float, bool]]] = []
        self.made: set[str] = set()  # keys this run evaluated (or failed a test on)
        self.reused = 0              # answers that came from earlier runs' entries

    def note_hit(self, beta: np.ndarray) -> None:
        """The dispatcher answered ``beta`` from the memo: count it as reused work when an
        earlier run made the entry (a repeat of this run's own evaluation is not reuse)."""
        key, _ = self._content(beta)
        if key not in self.made:
            self.reused += 1

    def _content(self, beta: np.ndarray) -> tuple[str, list]:
        content = mixture_content(beta, self.shas)
        return content_key(content), content

    def get(self, beta: np.ndarray) -> float | None:
        key, _ = self._content(beta)
        hit = self.pending.get(key)
        return hit[1] if hit is not None else self.memo.get(key)

    def put(self, beta: np.ndarray, accuracy: float) -> None:
        key, content = self._content(beta)
        self.pending[key] = (content, accuracy)
        self.made.add(key)
        self._maybe_flush()

    def failed(self, beta: np.ndarray) -> list[Threshold]:
        key, _ = self._content(beta)
        known = self.memo.failed(key) + [t for k, _, t in self.pending_failed if k == key]
        return [Threshold(value, strict) for value, strict in known]

    def put_failed(self, beta: np.ndarray, threshold: Threshold) -> None:
        key, content = self._content(beta)
        self.pending_failed.append((key, content, (threshold.value, threshold.strict)))
        self.made.add(key)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self.pending) + len(self.pending_failed) >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending or self.pending_failed:
            contents = [c for c, _ in self.pending.values()]
            accs = [a for _, a in self.pending.values()]
            self.memo.append(contents, accs, [(c, t) for _, c, t in self.pending_failed])
            self.pending, self.pending_failed = {}, []
