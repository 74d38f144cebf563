"""LiNeS (Wang et al., ICLR 2025; wang-kee/LiNeS) as a soup method: a layer-wise WiSE-FT that
keeps the shallow layers near the pretrained model. Residual block l of L gets

    lambda_l = alpha + beta * l / (L - 1),   w = (1 - lambda) theta0 + lambda theta_src

with theta0 the zero-shot classifier and theta_src the best individual; the stem (patch and
position embeddings, the first norm) gets alpha, as shallow as block 0, and the head (the final
norm, the projection, the linear head) gets alpha + beta, as deep as the last block. (alpha,
beta) is the point of ``grid`` with the best val accuracy (ties: the first). The blocks are the
model's level-2 components whatever ``soup.granularity`` is, so each grid point is a
per-component mixture of theta0 and theta_src, fused by the reference fusion (which skips a
zero weight: alpha = 1, beta = 0 is theta_src and alpha = 0, beta = 0 is theta0, bit for bit)."""
from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from ...methodspec import MethodSettings
from ...model.components import HEAD, STEM
from ...model.components import components as model_components
from .base import MethodContext, MethodResult, SoupMethod, interpolate_on_val, register

# alpha in {0, .25, .5, .75, 1}, beta >= 0, alpha + beta <= 1: every lambda in [0, 1]; 15 points
DEFAULT_GRID = [(a / 4, b / 4) for a in range(5) for b in range(5 - a)]


class LinesSettings(MethodSettings):
    """LiNeS's settings."""
    grid: list[tuple[float, float]] = Field(DEFAULT_GRID, description="the (alpha, beta) points scored on val, "
                                            "each one val pass of one model; every lambda must lie in [0, 1]: "
                                            "0 <= alpha <= 1 and 0 <= alpha + beta <= 1")

    @field_validator("grid")
    @classmethod
    def _in_range(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be distinct (alpha, beta) pairs, at least one; got {v}")
        bad = [p for p in v if not (0.0 <= p[0] <= 1.0 and 0.0 <= p[0] + p[1] <= 1.0)]
        if bad:
            raise ValueError(f"every lambda must lie in [0, 1] (0 <= alpha <= 1, 0 <= alpha + beta <= 1): {bad[0]}")
        return v


def lambdas(names: list[str], alpha: float, beta: float) -> np.ndarray:
    """lambda per level-2 component (stem, blocks in forward order, head)."""
    blocks = [n for n in names if n not in (STEM, HEAD)]
    L = len(blocks)
    depth = {name: (l / (L - 1) if L > 1 else 1.0) for l, name in enumerate(blocks)}
    depth.update({STEM: 0.0, HEAD: 1.0})
    return np.array([alpha + beta * depth[n] for n in names], dtype=np.float64)


def beta_of(lam: np.ndarray) -> np.ndarray:
    """(theta0, theta_src) x components: the mixture (1 - lambda) theta0 + lambda theta_src."""
    return np.stack([1.0 - lam, lam])


@register
class LiNeS(SoupMethod):
    name = "lines"
    summary = "LiNeS: zero-shot + best individual's update scaled by depth, alpha + beta l/(L-1), picked on val"
    marker = ("d", "tab:gray")
    needs = ("best_individual",)
    needs_models = True
    Settings = LinesSettings

    def run(self, ctx: MethodContext) -> MethodResult:
        grid = [tuple(p) for p in self.options(ctx.soup).grid]
        comps = model_components(ctx.models.inputs.reference, 2)
        names = [c.name for c in comps]
        picked = interpolate_on_val(ctx, grid, lambda p: beta_of(lambdas(names, *p)),
                                    lambda p: f"lines alpha={p[0]:g} beta={p[1]:g}", comps)
        (alpha, beta), best = picked.point, picked.best
        line = (f"lines val {picked.val:.4f} at alpha {alpha:g}, beta {beta:g} "
                f"(zero-shot + {ctx.ids[best]}; {len(grid)} points)")
        lam = lambdas(names, alpha, beta)
        return MethodResult(state=picked.state, search_val=picked.val, summary=line,
                            report={"lines": {"alpha": alpha, "beta": beta, "ingredient": ctx.ids[best],
                                              "lambdas": dict(zip(names, lam.tolist())),
                                              "val_by_point": {f"{a:g},{b:g}": v
                                                               for (a, b), v in picked.by_point.items()}}})
