"""Evaluators must agree. Exactness under parallelism assumes every evaluator predicts the same
for a mixture; on mixed hardware (two GPU models, a CPU beside GPUs, another dtype) that can
fail silently, and the memo would keep whichever answer came first. So each evaluator, as it
joins the pool, scores the same probe mixtures (a one-hot and a mixed one) on the same probe
images (the first PROBE_IMAGES val images), and its per-image predictions must equal the first
evaluator's bit for bit; otherwise the soup stops in one line naming the nodes and devices.
The predictions' fingerprint goes into the search memo's context, so a memo made on hardware
that predicts differently is not reused."""
from __future__ import annotations

import hashlib

import numpy as np

from ..errors import UserError

PROBE_IMAGES = 512


class EvaluatorsDisagree(UserError, RuntimeError):
    """Two evaluators predict differently for the same mixture: their results are not exact."""


def probe_mixtures(n_ingredients: int, n_components: int) -> list[np.ndarray]:
    """A one-hot mixture (the first ingredient) and a mixed one of the first two (unequal weights,
    different per component, so every component's fusion arithmetic takes part). Only the first
    two rows (in id order) take part, so adding ingredients (more trials, an import) leaves the
    probe, its fingerprint and so the memo's context as they were."""
    one_hot = np.zeros((n_ingredients, n_components))
    one_hot[0] = 1.0
    if n_ingredients == 1:
        return [one_hot, one_hot.copy()]
    mixed = np.zeros((n_ingredients, n_components))
    mixed[0] = (np.arange(n_components) + 1.0) / (n_components + 1.0)
    mixed[1] = 1.0 - mixed[0]
    return [one_hot, mixed]


def probe_predictions(evaluator, betas, n_images: int = PROBE_IMAGES) -> bytes:
    """A MixtureEvaluator's predicted class per probe image (the first ``n_images`` val images,
    in the batches scoring runs) for each mixture, as int64 bytes: what the evaluator's accuracy
    counts, before comparing with labels. The images come from the val shards the evaluator
    holds, else are read for the probe alone: it keeps no copy of them beside its shards."""
    import torch

    n = min(n_images, evaluator.n_images)
    out = evaluator.predictions_each([np.asarray(beta, dtype=np.float64) for beta in betas], 0, n)
    return torch.cat(out).to(torch.int64).numpy().tobytes()


def _where(info: dict) -> str:
    device = info.get("device_name") or info.get("device", "?")
    return f"node {info.get('node_id', '?')} device {info.get('device', '?')}" + (
        f" ({device})" if device != info.get("device") else "") + f" dtype {info.get('dtype', '?')}"


class ProbeCheck:
    """``admit(actor, info)`` for EvaluatorPool: probes each evaluator as it joins and compares
    its predictions with the first one's. ``fingerprint``: sha256 of those predictions."""

    def __init__(self, n_ingredients: int, n_components: int):
        self.betas = probe_mixtures(n_ingredients, n_components)
        self.reference: tuple[bytes, dict] | None = None

    def admit(self, actor, info: dict) -> None:
        import ray

        found = ray.get(actor.probe.remote(self.betas))
        self.compare(found, info)

    def compare(self, found: bytes, info: dict) -> None:
        if self.reference is None:
            self.reference = (found, info)
            return
        expected, first = self.reference
        if found != expected:
            a, b = np.frombuffer(expected, np.int64), np.frombuffer(found, np.int64)
            differ = int((a != b).sum()) if a.shape == b.shape else max(a.size, b.size)
            raise EvaluatorsDisagree(
                f"evaluators disagree on the probe mixtures ({differ} of {a.size} predictions differ): "
                f"{_where(first)} vs {_where(info)}; run the soup's evaluators on one kind of hardware and dtype "
                "(soup.evaluator_resources, evaluate.ingredient_dtype)")

    @property
    def fingerprint(self) -> str | None:
        return None if self.reference is None else hashlib.sha256(self.reference[0]).hexdigest()[:32]
