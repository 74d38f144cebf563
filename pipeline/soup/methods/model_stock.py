"""Model Stock (Jang, Yun, Han, ECCV 2024; naver-ai/model-stock) as a soup method: no forward
pass, only geometry. Per tensor of the image tower and the head, with the members' deltas from
their common start w0 (the zero-shot classifier, or ``start``):

    c = mean pairwise cosine of (w_i - w0);  t = N c / (1 + (N - 1) c);  w = t mean(w_i) + (1 - t) w0

Members are the top N ingredients by val (``members``, default 2, the paper's setting). As in
the authors' code a negative cosine is not clamped (t < 0 moves away from the members); a pair
where a delta is zero has cosine 0 (the authors' epsilon gives the same), so a tensor no member
changed stays w0, which equals every member there. If the members' unit deltas cancel exactly
(1 + (N - 1) c = 0, where the formula divides by zero) t is 0: w0. Computed from float32
weights with float64 sums, one member in memory at a time."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator

from ... import storage
from ...methodspec import MethodSettings
from ..mmms import sorted_best_first
from .base import MethodContext, MethodError, MethodResult, SoupMethod, register


class ModelStockSettings(MethodSettings):
    """Model Stock's settings."""
    members: int | Literal["all"] = Field(2, description="how many of the best ingredients by val it "
                                          "averages (2: the paper's setting), or 'all'")
    start: str | None = Field(None, description="the checkpoint the members were finetuned from (a classifier "
                              "of this model, path or URI); None: the zero-shot classifier, which trained "
                              "ingredients start from. Imported ingredients may have started elsewhere (the "
                              "model-soups checkpoints from a linear-probe head)")

    @field_validator("members")
    @classmethod
    def _at_least_two(cls, v):
        if v != "all" and v < 2:
            raise ValueError(f"must be 'all' or at least 2 (Model Stock needs two finetunes), got {v}")
        return v


def model_stock(start: Mapping[str, torch.Tensor], members: Iterable[Mapping[str, torch.Tensor]],
                names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(the merged state dict, t per tensor) of ``members`` (state dicts, consumed one at a time)
    around ``start``; tensors in ``names`` are merged, the others are ``start``'s."""
    sum_w: dict[str, torch.Tensor] = {}
    sum_u: dict[str, torch.Tensor] = {}
    moved = dict.fromkeys(names, 0)      # members whose delta is non-zero, per tensor
    n = 0
    for state in members:
        n += 1
        for name in names:
            w = state[name].to(torch.float32)
            delta = (w - start[name].to(torch.float32)).to(torch.float64)
            norm = torch.linalg.vector_norm(delta)
            unit = delta / norm if norm > 0 else torch.zeros_like(delta)
            sum_u[name] = sum_u[name] + unit if name in sum_u else unit
            sum_w[name] = sum_w[name] + w.to(torch.float64) if name in sum_w else w.to(torch.float64)
            moved[name] += int(norm > 0)
        state = None  # one member at a time
    if n == 0:
        raise MethodError("model_stock: no members")
    merged = {name: t.clone() for name, t in start.items()}
    ts: dict[str, float] = {}
    for name in names:
        if n == 1:
            t = 1.0
        else:
            # sum over ordered pairs i != j of u_i . u_j = |sum u|^2 - sum |u_i|^2
            pairs = float(torch.dot(sum_u[name].flatten(), sum_u[name].flatten())) - moved[name]
            c = pairs / (n * (n - 1))
            denominator = 1.0 + (n - 1) * c
            t = n * c / denominator if denominator > 0 else 0.0
        mean = sum_w[name] / n
        w0 = start[name].to(torch.float64)
        merged[name] = (t * mean + (1.0 - t) * w0).to(start[name].dtype)
        ts[name] = t
    return merged, ts


@register
class ModelStock(SoupMethod):
    name = "model_stock"
    summary = "Model Stock: per tensor, the members' mean pulled towards their start by their deltas' angle"
    marker = ("p", "tab:cyan")
    needs_models = True
    Settings = ModelStockSettings

    def content(self, soup) -> dict:
        start = self.options(soup).start
        return {"start_sha256": hashlib.sha256(storage.read_bytes(start)).hexdigest()} if start else {}

    def run(self, ctx: MethodContext) -> MethodResult:
        opts, models = self.options(ctx.soup), ctx.models
        order = sorted_best_first(ctx.val_accs)
        rows = order if opts.members == "all" else order[:opts.members]
        ids = [ctx.ids[j] for j in rows]
        start = models.zero_shot_state()
        if opts.start is not None:
            start = models.checkpoint_state(opts.start, f"soup.methods.model_stock.start {opts.start!r}")
        elif any(models.ingredient(j).source == "import" for j in rows):
            ctx.log(f"soup: warning: model_stock's members {', '.join(ids)} were imported; their start is taken to "
                    "be the zero-shot classifier, but the head they started from may differ (set "
                    "soup.methods.model_stock.start to it)")
        names = [n for c in models.components for n in (*c.params, *c.buffers)]
        state, ts = model_stock(start, (models.ingredient_state(j) for j in rows), names)
        mean_t = sum(ts.values()) / len(ts)
        line = f"model_stock of {', '.join(ids)}: t from {min(ts.values()):.3f} to {max(ts.values()):.3f} (mean {mean_t:.3f})"
        return MethodResult(state=state, summary=line,
                            report={"model_stock": {"members": ids, "start": opts.start or "zero_shot",
                                                    "t": {n: round(t, 6) for n, t in ts.items()}}})
