"""The soup report: report.json (every method's accuracies and mixture, the run's settings) and
report.md (the same table with a 95 % Wilson interval per accuracy). Pure functions of numbers:
the stage measures, this module only arranges and formats."""
from __future__ import annotations

import math
import platform
from collections.abc import Mapping, Sequence

import numpy as np

from ..prepared import ZERO_SHOT
from .. import methodspec

Z_95 = 1.959963984540054  # two-sided 95 % normal quantile
CONFIDENCE = 0.95


# ---- intervals ------------------------------------------------------------------------------

def wilson_interval(accuracy: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's ``binomtest(...).proportion_ci``): honest
    at small n and near 0 or 1, where the plain normal interval leaves [0, 1]. ``accuracy`` is
    a count of ``n`` images divided by ``n``."""
    from scipy.stats import binomtest

    if n <= 0:
        raise ValueError(f"wilson_interval: n must be > 0, got {n}")
    k = round(float(accuracy) * n)
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def mean_interval(accuracies: Sequence[float], ns: Sequence[int], z: float = Z_95) -> tuple[float, float]:
    """Normal interval of the unweighted mean of independent proportions (the ood average)."""
    k = len(accuracies)
    mean = sum(accuracies) / k
    var = sum(p * (1 - p) / n for p, n in zip(accuracies, ns)) / (k * k)
    half = z * math.sqrt(var)
    return max(0.0, mean - half), min(1.0, mean + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of paired outcomes with ``b`` and ``c`` discordant pairs
    (A right and B wrong, and the reverse): scipy's exact binomial test of b of b + c under
    p = 1/2, i.e. 2 P(X <= min(b, c)) capped at 1 (exact and fast for the tens of thousands of
    images of ImageNet's sets)."""
    from scipy.stats import binomtest

    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    return float(binomtest(b, n, 0.5).pvalue)


def discordant(a: bytes, b: bytes, n: int) -> tuple[int, int]:
    """(a right and b wrong, a wrong and b right) of two per-image correctness bitmaps of the
    same ``n`` images in the same order (numpy.packbits)."""
    x = np.unpackbits(np.frombuffer(a, dtype=np.uint8), count=n).astype(bool)
    y = np.unpackbits(np.frombuffer(b, dtype=np.uint8), count=n).astype(bool)
    if x.size != n or y.size != n:
        raise ValueError(f"discordant: bitmaps of {x.size} and {y.size} images, expected {n}")
    return int(np.count_nonzero(x & ~y)), int(np.count_nonzero(~x & y))


SIGNIFICANCE = 0.05


def mcnemar_tests(scores: Mapping[str, Mapping[str, Mapping]], reference: str, names: Sequence[str],
                  split_names: Sequence[str]) -> dict:
    """The exact McNemar test of ``reference`` against each other model on each split, from the
    per-image outcomes the scoring kept (``correct_bits``): {"reference", "alpha", "tests":
    {model: {split: {"reference_only", "other_only", "p"}}}}."""
    import base64

    tests: dict = {}
    for name in names:
        if name == reference:
            continue
        for split in split_names:
            ref, other = scores[reference][split], scores[name][split]
            b, c = discordant(base64.b64decode(ref["correct_bits"]), base64.b64decode(other["correct_bits"]),
                              int(ref["n"]))
            tests.setdefault(name, {})[split] = {"reference_only": b, "other_only": c, "p": mcnemar_exact(b, c)}
    return {"reference": reference, "alpha": SIGNIFICANCE, "tests": tests}


def not_significant(report: Mapping, name: str, split: str) -> bool:
    """Whether the paired test cannot tell ``name`` from the reference (the published method) on ``split``."""
    test = report.get("mcnemar", {}).get("tests", {}).get(name, {}).get(split)
    return test is not None and test["p"] >= report["mcnemar"]["alpha"]


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


def table_cells(report: Mapping) -> tuple[list[tuple[str, str]], list[tuple[str, list[tuple]]]]:
    """The accuracy table as numbers: columns [(role, split name)] (val, id_test, each ood set,
    then ("ood avg", "")) and rows [(method, [(accuracy, 95 % interval or None, ≈ mark), ...])]."""
    sizes = report["split_sizes"]
    splits = report["splits"]
    ood_names = list(splits["ood"])
    columns = [("val", splits["val"]), ("id_test", splits["id_test"]), *(("ood", s) for s in ood_names),
               ("ood avg", "")]
    rows = []
    for name, m in report["methods"].items():
        cells = [(m["val"], wilson_interval(m["val"], sizes[splits["val"]]), False),
                 (m["id_test"], wilson_interval(m["id_test"], sizes[splits["id_test"]]),
                  not_significant(report, name, splits["id_test"]))]
        cells += [(m["ood"][s], wilson_interval(m["ood"][s], sizes[s]), not_significant(report, name, s))
                  for s in ood_names]
        cells.append((m["ood_avg"], mean_interval([m["ood"][s] for s in ood_names], [sizes[s] for s in ood_names])
                      if ood_names else None, False))
        rows.append((name, cells))
    return columns, rows


def table_rows(report: Mapping) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the accuracy table: val, id_test, each ood set, ood avg, with intervals."""
    columns, rows = table_cells(report)
    header = ["method", *(f"{role} ({name})" if role in ("val", "id_test") else name or role
                          for role, name in columns)]
    return header, [[name, *(_cell(acc, interval) + (" ≈" if mark else "") for acc, interval, mark in cells)]
                    for name, cells in rows]


def markdown_table(report: Mapping) -> str:
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Mapping) -> str:
    """report.md: the table, what each number means, and how the soups were made."""
    sizes = report["split_sizes"]
    published = report.get("published", "mmms")
    entry = report["methods"][published]
    ids = list(report.get("ingredient_scores") or entry["ingredients"])
    kept_beta = np.asarray(entry["beta"])
    chosen = [entry["ingredients"][j] for j in np.flatnonzero(kept_beta.any(axis=1))] if kept_beta.size else []
    timings = report.get("timings", {})
    lines = [
        f"# frankensoup report — run {report.get('run_id', '?')}",
        "",
        "Top-1 accuracy in %, with its 95 % interval in brackets (Wilson score interval per split; "
        "the ood average's interval is the normal interval of a mean of independent proportions).",
        "",
        markdown_table(report),
        "",
        *mcnemar_lines(report),
        "Images per split: " + ", ".join(f"{s} {n}" for s, n in sizes.items()) + ".",
        "",
        *[f"- {name}: {summary}" for name, summary in method_summaries(report)],
        f"- components ({len(report['components'])}): {', '.join(report['components'])}",
        f"- ingredients ({len(ids)}): {', '.join(ids)}",
        f"- published (fused/): {published}" + (f", mixing {', '.join(chosen)}" if chosen else ""),
        *([f"- phase 2 kept: {report['phase2_kept']} ({report.get('phase2_decision', '')})"]
          if "phase2_kept" in report else []),
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
    """(name, what it is) of each row of the table, as each method declared it (methodspec)."""
    out = [(ZERO_SHOT, "the base CLIP with its zero-shot head (prompt templates), not finetuned")]
    specs = methodspec.load()
    return out + [(n, specs[n].summary) for n in report["methods"] if n in specs]


def mcnemar_lines(report: Mapping) -> list[str]:
    """report.md's note on the paired tests: what ≈ means, and the p-values."""
    tests = report.get("mcnemar")
    if not tests or not tests["tests"]:
        return []
    ref, alpha = tests["reference"], tests["alpha"]
    splits = list(next(iter(tests["tests"].values())))
    lines = [f"≈: not told apart from {ref} by the exact McNemar test on the same images (p ≥ {alpha:g}); "
             f"p-values of {ref} against each row:", "",
             "| vs | " + " | ".join(splits) + " |", "|" + "---|" * (len(splits) + 1)]
    for name, by_split in tests["tests"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by_split[s]['p']:.3g}" for s in splits) + " |")
    return lines + [""]
