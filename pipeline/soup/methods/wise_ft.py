"""WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022) as a soup method:
the weight-space interpolation (1 - alpha) zero-shot + alpha best individual, alpha picked on
val from ``soup.wise_ft.alphas``. alpha = 0 is the zero-shot model and alpha = 1 the best
individual, weight for weight (the reference fusion skips a zero weight)."""
from __future__ import annotations

import numpy as np

from ...config import SoupConfig
from .base import MethodContext, MethodResult, SoupMethod, register


@register
class WiseFT(SoupMethod):
    name = "wise_ft"
    summary = "WiSE-FT: (1 - alpha) zero-shot + alpha best individual, alpha picked on val"
    marker = ("X", "tab:brown")
    needs = ("best_individual",)
    needs_models = True

    def enabled(self, soup: SoupConfig) -> bool:
        return soup.wise_ft.enabled

    def settings(self, soup: SoupConfig) -> dict:
        return {"alphas": list(soup.wise_ft.alphas)}

    def run(self, ctx: MethodContext) -> MethodResult:
        best = int(np.flatnonzero(ctx.results["best_individual"].beta[:, 0])[0])
        models = ctx.models
        ends = [models.zero_shot_state(), models.ingredient_state(best)]
        C = models.n_components
        states = {f"wise_ft alpha={a:g}": models.fuse(ends, np.array([[1.0 - a] * C, [a] * C]))
                  for a in ctx.soup.wise_ft.alphas}
        accs = models.val_accuracy(states)
        by_alpha = {a: accs[f"wise_ft alpha={a:g}"] for a in ctx.soup.wise_ft.alphas}
        alpha = max(by_alpha, key=lambda a: (by_alpha[a], -list(by_alpha).index(a)))  # ties: the first
        line = f"wise_ft val {by_alpha[alpha]:.4f} at alpha {alpha:g} (zero-shot + {ctx.ids[best]})"
        return MethodResult(state=states[f"wise_ft alpha={alpha:g}"], search_val=by_alpha[alpha], summary=line,
                            details={"alpha": alpha, "ingredient": ctx.ids[best], "val_by_alpha": by_alpha},
                            report={"wise_ft": {"alpha": alpha, "ingredient": ctx.ids[best],
                                                "val_by_alpha": {f"{a:g}": v for a, v in by_alpha.items()}}})
