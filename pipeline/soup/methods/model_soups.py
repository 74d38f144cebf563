"""The model-soups baselines (Wortsman et al. 2022) as soup methods: best individual, uniform
soup and greedy soup (their maths: pipeline/soup/baselines.py)."""
from __future__ import annotations

import numpy as np

from ...config import SoupConfig
from .. import baselines
from .base import MethodContext, MethodResult, SoupMethod, register


@register
class BestIndividual(SoupMethod):
    name = "best_individual"
    summary = "the ingredient with the best val accuracy, alone"
    marker = ("D", "tab:blue")

    def budget(self, soup: SoupConfig, n_ingredients: int, n_components: int) -> int:
        return 1

    def run(self, ctx: MethodContext) -> MethodResult:
        beta = baselines.best_individual(ctx.val_accs, ctx.n_components)
        (acc,) = ctx.evaluate([beta])
        return MethodResult(beta, acc, f"best individual val {acc:.4f}")


@register
class UniformSoup(SoupMethod):
    name = "uniform_soup"
    summary = "every ingredient with weight 1/K"
    marker = ("^", "tab:green")

    def budget(self, soup: SoupConfig, n_ingredients: int, n_components: int) -> int:
        return 1

    def run(self, ctx: MethodContext) -> MethodResult:
        beta = baselines.uniform_soup(ctx.K, ctx.n_components)
        (acc,) = ctx.evaluate([beta])
        return MethodResult(beta, acc, f"uniform soup val {acc:.4f}")


@register
class GreedySoup(SoupMethod):
    name = "greedy_soup"
    summary = "ingredients best first, each kept when the uniform soup with it beats val"
    marker = ("v", "tab:orange")

    def budget(self, soup: SoupConfig, n_ingredients: int, n_components: int) -> int:
        return n_ingredients

    def run(self, ctx: MethodContext) -> MethodResult:
        beta, trace = baselines.greedy_soup(ctx.val_accs, ctx.n_components, ctx.evaluate)
        acc = trace[-1][1]
        used = int(np.count_nonzero(beta.any(axis=1)))
        return MethodResult(beta, acc, f"greedy soup val {acc:.4f} ({used} of {ctx.K} ingredients)", details=trace,
                            trace=[[n, a] for n, a in trace])
