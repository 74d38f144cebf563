"""The output ensemble of all ingredients as a soup method: the mean of their logits (model
soups' reference without a cost limit: K forward passes per image, where a soup needs one)."""
from __future__ import annotations

from pydantic import Field

from ...methodspec import MethodSettings
from .base import MethodContext, MethodResult, SoupMethod, register


class OutputEnsembleSettings(MethodSettings):
    """K forward passes per image (model soups' reference without a cost limit), scored on every
    split: switch it off for large K on large sets."""
    enabled: bool = Field(True, description="whether the soup stage scores the output ensemble of all ingredients")


@register
class OutputEnsemble(SoupMethod):
    name = "output_ensemble"
    summary = "output ensemble: the mean of every ingredient's logits (K forward passes per image)"
    marker = ("h", "tab:olive")
    needs_models = True
    one_model = False
    Settings = OutputEnsembleSettings

    def run(self, ctx: MethodContext) -> MethodResult:
        rows = list(range(ctx.K))
        acc = ctx.models.val_accuracy(ensembles={self.name: rows})[self.name]
        return MethodResult(ensemble=rows, search_val=acc, summary=f"output ensemble of {ctx.K} val {acc:.4f}")
