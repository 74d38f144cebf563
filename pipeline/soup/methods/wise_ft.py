"""WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022) as a soup method:
the weight-space interpolation (1 - alpha) zero-shot + alpha best individual, alpha picked on
val from ``soup.methods.wise_ft.alphas``. alpha = 0 is the zero-shot model and alpha = 1 the best
individual, weight for weight (the reference fusion skips a zero weight)."""
from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from ...methodspec import MethodSettings
from .base import MethodContext, MethodResult, SoupMethod, interpolate_on_val, register


class WiseFTSettings(MethodSettings):
    """WiSE-FT (Wortsman et al. 2022): (1 - alpha) zero-shot + alpha best individual, in weight
    space, alpha the grid point with the best val accuracy (ties: the first)."""
    alphas: list[float] = Field([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                                description="the grid of alpha scored on val (0 = zero-shot, 1 = best individual)")

    @field_validator("alphas")
    @classmethod
    def _grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= a <= 1.0 for a in v) or len(set(v)) != len(v):
            raise ValueError(f"must be distinct numbers in [0, 1], at least one; got {v}")
        return v


@register
class WiseFT(SoupMethod):
    name = "wise_ft"
    summary = "WiSE-FT: (1 - alpha) zero-shot + alpha best individual, alpha picked on val"
    marker = ("X", "tab:brown")
    needs = ("best_individual",)
    needs_models = True
    Settings = WiseFTSettings

    def run(self, ctx: MethodContext) -> MethodResult:
        C = ctx.models.n_components
        picked = interpolate_on_val(ctx, self.options(ctx.soup).alphas, lambda a: np.array([[1.0 - a] * C, [a] * C]),
                                    lambda a: f"wise_ft alpha={a:g}")
        alpha, best, by_alpha = picked.point, picked.best, picked.by_point
        line = f"wise_ft val {picked.val:.4f} at alpha {alpha:g} (zero-shot + {ctx.ids[best]})"
        return MethodResult(state=picked.state, search_val=picked.val, summary=line,
                            details={"alpha": alpha, "ingredient": ctx.ids[best], "val_by_alpha": by_alpha},
                            report={"wise_ft": {"alpha": alpha, "ingredient": ctx.ids[best],
                                                "val_by_alpha": {f"{a:g}": v for a, v in by_alpha.items()}}})
