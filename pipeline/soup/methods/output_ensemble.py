"""The output ensemble of all ingredients as a soup method: the mean of their logits (model
soups' reference without a cost limit: K forward passes per image, where a soup needs one)."""
from __future__ import annotations

from ...config import SoupConfig
from .base import MethodContext, MethodResult, SoupMethod, register


@register
class OutputEnsemble(SoupMethod):
    name = "output_ensemble"
    summary = "output ensemble: the mean of every ingredient's logits (K forward passes per image)"
    marker = ("h", "tab:olive")
    needs_models = True

    def enabled(self, soup: SoupConfig) -> bool:
        return soup.output_ensemble.enabled

    def run(self, ctx: MethodContext) -> MethodResult:
        rows = list(range(ctx.K))
        acc = ctx.models.val_accuracy(ensembles={self.name: rows})[self.name]
        return MethodResult(ensemble=rows, search_val=acc, summary=f"output ensemble of {ctx.K} val {acc:.4f}")
