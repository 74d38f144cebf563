"""The report's figures, drawn only from report.json's numbers: ID vs OOD accuracy (the model
soups figure), the published method's mixture as a heatmap (mmms's when the published model is
not a mixture), and the search traces of the methods that searched."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import methodspec  # noqa: E402

ZERO_SHOT_STYLE = ("s", "tab:gray")


def method_style(name: str) -> tuple[str, str]:
    """(marker, colour) of a report row: each soup method says its own (declared in methodspec)."""
    if name == "zero_shot":
        return ZERO_SHOT_STYLE
    spec = methodspec.load().get(name)
    return spec.marker if spec is not None else ("o", "black")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def id_vs_ood(report: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ing = report.get("ingredient_scores", {})
    if ing:
        ax.scatter([s["id_test"] for s in ing.values()], [s["ood_avg"] for s in ing.values()],
                   c="lightsteelblue", edgecolors="steelblue", label="finetuned ingredients", zorder=2)
    for name, m in report["methods"].items():
        marker, color = method_style(name)
        ax.scatter([m["id_test"]], [m["ood_avg"]], marker=marker, s=140 if name == published(report) else 70,
                   c=color, edgecolors="black", label=name, zorder=3)
    ax.set_xlabel("ID test accuracy")
    ax.set_ylabel("OOD accuracy (mean over shifted sets)")
    ax.set_title("Soups vs their ingredients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def beta_heatmap(report: dict, method: str = "mmms") -> bytes:
    m = report["methods"][method]
    beta = m["beta"]
    comps = report["components"]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(comps) + 2), max(2.5, 0.35 * len(beta) + 1.5)))
    im = ax.imshow(beta, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, max(max(r) for r in beta)))
    ax.set_xticks(range(len(comps)), comps, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(beta)), m["ingredients"], fontsize=7)
    ax.set_xlabel("component")
    ax.set_ylabel("ingredient")
    ax.set_title(f"{method}: mixing factors beta[ingredient, component]")
    fig.colorbar(im, ax=ax)
    return _png(fig)


def published(report: dict) -> str:
    return report.get("published", "mmms")


def traces(report: dict) -> dict[str, list]:
    """{method: [[evaluations, best val so far], ...]} of the methods that searched."""
    found = dict(report.get("traces") or {})
    if not found and report.get("search_trace"):  # a report from before per-method traces
        found["mmms"] = report["search_trace"]
    return {name: t for name, t in found.items() if t}


def search_trace(report: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, trace in traces(report).items():
        xs, ys = zip(*trace)
        ax.step(xs, ys, where="post", color=method_style(name)[1], label=f"{name} best val")
    for name in ("best_individual",):
        if name in report["methods"]:
            ax.axhline(report["methods"][name]["val"], ls="--", lw=1, color=method_style(name)[1], label=name)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best val accuracy")
    ax.set_title("Search traces")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def heatmap_method(report: dict) -> str | None:
    """The published method when it is a mixture, else mmms when it is in the report."""
    for name in (published(report), "mmms"):
        if report["methods"].get(name, {}).get("beta"):
            return name
    return None


def render_plots(report: dict) -> dict[str, bytes]:
    """PNG bytes by file name, published beside report.json: id_vs_ood.png, beta_<method>.png
    (when a mixture is there to draw) and search_trace.png (when a method searched)."""
    pngs = {"id_vs_ood.png": id_vs_ood(report)}
    method = heatmap_method(report)
    if method is not None:
        pngs[f"beta_{method}.png"] = beta_heatmap(report, method)
    if traces(report):
        pngs["search_trace.png"] = search_trace(report)
    return pngs
