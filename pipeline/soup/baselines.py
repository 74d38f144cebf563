"""The model-soups baselines (Wortsman et al. 2022) as mixtures: best individual (one-hot),
uniform soup (1/K) and greedy soup (1/|S| on a greedily grown subset)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..mixture import Threshold, check_accuracies
from . import mixing
from .mmms import sorted_best_first


def best_individual(val_accs: Sequence[float], C: int) -> np.ndarray:
    """The ingredient with the best val accuracy (ties: the lower index), alone."""
    return mixing.one_hot(len(val_accs), C, sorted_best_first(val_accs)[0])


def uniform_soup(K: int, C: int) -> np.ndarray:
    return mixing.uniform(K, C)


def greedy_soup(val_accs: Sequence[float], C: int,
                evaluate: Callable[[list[np.ndarray]], list[float]]) -> tuple[np.ndarray, list[tuple[int, float]]]:
    """Model soups' greedy soup: ingredients best first; one joins when the uniform soup with it
    is strictly better on val than the soup without it (main.py: ``if acc > best_so_far``).
    An evaluator with ``score(betas, thresholds)`` gets that test as ``Threshold(best,
    strict=True)`` and may stop scoring once it cannot pass: the same decisions, fewer images.
    Returns (beta, trace of (evaluations, best val so far))."""
    order = sorted_best_first(val_accs)
    K = len(order)
    chosen = [order[0]]
    best = check_accuracies(evaluate([mixing.one_hot(K, C, order[0])]), 1)[0]
    trace = [(1, best)]
    score = getattr(evaluate, "score", None)
    for n, j in enumerate(order[1:], start=2):
        beta = mixing.subset(K, C, chosen + [j])
        test = Threshold(best, strict=True)
        if score is not None:
            (result,) = score([beta], [test])
            acc = result.accuracy
        else:
            acc = check_accuracies(evaluate([beta]), 1)[0]
        if acc is not None and test.passes(acc):
            chosen.append(j)
            best = acc
        trace.append((n, best))
    return mixing.subset(K, C, chosen), trace
