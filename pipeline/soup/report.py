"""The soup report: report.json (every method's accuracies and mixture, the run's settings) and
report.md (the same table with a 95 % Wilson interval per accuracy). Pure functions of numbers:
the stage measures, this module only arranges and formats."""
from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile


# ---- intervals ------------------------------------------------------------------------------

def wilson_interval(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion: honest at small n and near 0 or 1, where the
    plain normal interval leaves [0, 1]."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be > 0, got {n}")
    p = float(accuracy)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(accuracies: Sequence[float], ns: Sequence[int], z: float = Z_95) -> tuple[float, float]:
    """Normal interval of the unweighted mean of independent proportions (the ood average)."""
    k = len(accuracies)
    mean = sum(accuracies) / k
    var = sum(p * (1 - p) / n for p, n in zip(accuracies, ns)) / (k * k)
    half = z * math.sqrt(var)
    return max(0.0, mean - half), min(1.0, mean + half)


# ---- report.json ----------------------------------------------------------------------------

def method_entry(val: float, id_test: float, ood: Mapping[str, float], ingredients: Sequence[str],
                 beta, search_val: float | None = None) -> dict:
    """One row of report.json's ``methods``; ``beta`` rows follow ``ingredients``."""
    ood = {name: float(acc) for name, acc in ood.items()}
    beta = np.asarray(beta, dtype=np.float64).tolist() if len(ingredients) else []
    entry = {"val": float(val), "id_test": float(id_test), "ood": ood,
             "ood_avg": float(np.mean(list(ood.values()))) if ood else None,
             "ingredients": list(ingredients), "beta": beta}
    if search_val is not None:
        entry["search_val"] = float(search_val)  # the mixture evaluator's val, which the search maximised
    return entry


def ingredient_scores(evaluations: Mapping[str, Mapping[str, float]], ids: Sequence[str], val_split: str,
                      id_test_split: str, ood_names: Sequence[str]) -> dict:
    """The evaluate stage's numbers of each ingredient, in report.json's shape."""
    out = {}
    for i in ids:
        accs = evaluations[i]
        ood = {s: float(accs[s]) for s in ood_names}
        out[i] = {"val": float(accs[val_split]), "id_test": float(accs[id_test_split]), "ood": ood,
                  "ood_avg": float(np.mean(list(ood.values()))) if ood else None}
    return out


def versions() -> dict[str, str]:
    """The versions a result depends on, for report.json."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("frankensoup", "torch", "open_clip_torch", "nevergrad", "numpy", "ray", "pyarrow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---- report.md ------------------------------------------------------------------------------

def _cell(acc: float | None, interval: tuple[float, float] | None) -> str:
    if acc is None:
        return "–"
    if interval is None:
        return f"{100 * acc:.1f}"
    lo, hi = interval
    return f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def table_rows(report: Mapping) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the accuracy table: val, id_test, each ood set, ood avg, with intervals."""
    sizes = report["split_sizes"]
    splits = report["splits"]
    ood_names = list(splits["ood"])
    header = ["method", f"val ({splits['val']})", f"id_test ({splits['id_test']})", *ood_names, "ood avg"]
    rows = []
    for name, m in report["methods"].items():
        cells = [name,
                 _cell(m["val"], wilson_interval(m["val"], sizes[splits["val"]])),
                 _cell(m["id_test"], wilson_interval(m["id_test"], sizes[splits["id_test"]]))]
        cells += [_cell(m["ood"][s], wilson_interval(m["ood"][s], sizes[s])) for s in ood_names]
        cells.append(_cell(m["ood_avg"], mean_interval([m["ood"][s] for s in ood_names], [sizes[s] for s in ood_names])
                           if ood_names else None))
        rows.append(cells)
    return header, rows


def markdown_table(report: Mapping) -> str:
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Mapping) -> str:
    """report.md: the table, what each number means, and how the soups were made."""
    sizes = report["split_sizes"]
    ids = report["methods"]["mmms"]["ingredients"]
    kept_beta = np.asarray(report["methods"]["mmms"]["beta"])
    chosen = [ids[j] for j in np.flatnonzero(kept_beta.any(axis=1))] if kept_beta.size else []
    timings = report.get("timings", {})
    lines = [
        f"# frankensoup report — run {report.get('run_id', '?')}",
        "",
        "Top-1 accuracy in %, with its 95 % interval in brackets (Wilson score interval per split; "
        "the ood average's interval is the normal interval of a mean of independent proportions).",
        "",
        markdown_table(report),
        "",
        "Images per split: " + ", ".join(f"{s} {n}" for s, n in sizes.items()) + ".",
        "",
        *[f"- {name}: {summary}" for name, summary in method_summaries(report)],
        f"- components ({len(report['components'])}): {', '.join(report['components'])}",
        f"- ingredients ({len(ids)}): {', '.join(ids)}",
        f"- mmms mixes: {', '.join(chosen)}",
        f"- phase 2 kept: {report['phase2_kept']} ({report.get('phase2_decision', '')})",
        f"- optimizer {report['config']['soup']['optimizer']}, W = {report['config']['soup']['num_workers']}, "
        f"seed {report['seed']}",
        "- seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        "",
        "`val` is the split the search maximises, so soups are favoured there; compare them on "
        "id_test and the ood sets. Every number was measured on the model as published "
        "(zero_shot: the evaluate stage's numbers).",
    ]
    return "\n".join(lines) + "\n"


def method_summaries(report: Mapping) -> list[tuple[str, str]]:
    """(name, what it is) of each row of the table, from the soup-method registry."""
    from .methods import REGISTRY

    out = [("zero_shot", "the base CLIP with its zero-shot head (prompt templates), not finetuned")]
    return out + [(n, REGISTRY[n].summary) for n in report["methods"] if n in REGISTRY]
