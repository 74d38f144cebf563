"""Manifold mixing model soup as two soup methods: ``mmms_phase1`` (sequential per-component
mixing, speculative on E evaluators) and ``mmms`` (phase 2's joint refinement of it, kept only
when it beats phase 1 on val). The algorithm: pipeline/soup/mmms.py."""
from __future__ import annotations

from ...config import SoupConfig
from .. import mmms
from .base import MethodContext, MethodResult, SoupMethod, register


@register
class MMMSPhase1(SoupMethod):
    name = "mmms_phase1"
    summary = "MMMS phase 1: ingredients best first, each mixed in with per-component lambdas"
    marker = ("P", "tab:pink")

    def settings(self, soup: SoupConfig) -> dict:
        return {k: getattr(soup, k) for k in ("optimizer", "num_workers", "seed", "tau", "bounds_delta",
                                              "max_func_evals_per_dim", "second_pass_low", "granularity")}

    def budget(self, soup: SoupConfig, n_ingredients: int, n_components: int) -> int:
        return mmms.phase1_budget(n_ingredients, n_components, soup)

    def run(self, ctx: MethodContext) -> MethodResult:
        p1 = mmms.phase1(ctx.val_accs, ctx.n_components, ctx.evaluate, ctx.soup, ctx.progress)
        c = p1.cost
        line = (f"mmms phase 1 val {p1.val_acc:.4f} ({p1.n_evals} evaluations, {len(p1.chosen)} ingredients "
                f"mixed; {c['evaluations']} run on {c['evaluators']} evaluators, {c['speculative_dropped']} of "
                f"them dropped speculation, {c['wall_seconds']:.1f}s)")
        return MethodResult(p1.beta, p1.val_acc, line, details=p1)


@register
class MMMS(SoupMethod):
    name = "mmms"
    summary = "MMMS: phase 1, refined jointly by phase 2 when that beats phase 1 on val"
    marker = ("*", "tab:red")
    needs = ("mmms_phase1",)

    def settings(self, soup: SoupConfig) -> dict:
        return {"phase2": soup.phase2.model_dump(mode="json")}

    def budget(self, soup: SoupConfig, n_ingredients: int, n_components: int) -> int:
        return n_ingredients * n_components * soup.phase2.evals_per_dim if soup.phase2.enabled else 0

    def run(self, ctx: MethodContext) -> MethodResult:
        p1: mmms.Phase1Result = ctx.results["mmms_phase1"].details
        p2, kept = None, False
        if ctx.soup.phase2.enabled:
            p2 = mmms.phase2(p1.beta, ctx.evaluate, ctx.soup, ctx.progress)
            kept = p2.val_acc > p1.val_acc  # phase 2 must earn its place on val
            verdict = "kept" if kept else "not better, phase 1 kept"
            decision = f"phase 2 val {p2.val_acc:.4f} vs phase 1 {p1.val_acc:.4f}: {verdict}"
        else:
            decision = "phase 2 disabled (soup.phase2.enabled=false)"
        beta, acc = (p2.beta, p2.val_acc) if kept else (p1.beta, p1.val_acc)
        fields = {"phase2_kept": kept, "phase2_decision": decision, "search_trace": search_trace(p1, p2),
                  "phase1_decisions": [[ctx.ids[j], outcome, a] for j, outcome, a in p1.decisions]}
        return MethodResult(beta, acc, decision, details=(p1, p2, kept), report=fields, trace=fields["search_trace"])


def search_trace(p1: mmms.Phase1Result, p2: mmms.Phase2Result | None) -> list[list[float]]:
    """(cumulative evaluations, best val so far): phase 1, then phase 2."""
    trace = [[n, acc] for n, acc in p1.trace]
    if p2 is not None:
        offset, best = p1.n_evals, p1.val_acc
        for n, acc in p2.trace:
            best = max(best, acc)
            trace.append([offset + n, best])
    return trace
