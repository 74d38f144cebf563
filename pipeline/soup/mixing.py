"""Mixture maths (the contract, ``validate`` and the component of each tensor, is
``pipeline/mixture.py``). A mixture is a float64 matrix ``beta[j, c]`` (ingredient j, component c) with
columns >= 0 summing to 1; the fused model is ``fused[p] = sum_j beta[j, comp(p)] * W_j[p]``.
Every soup is a mixture: best individual = one-hot, uniform = 1/K, greedy = 1/|S| on a
subset, MMMS = lambdas (phase 1) or mu (phase 2) turned into a beta. See docs/algorithm.md."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from ..mixture import MixtureError, tensor_owners, validate


def one_hot(K: int, C: int, j: int) -> np.ndarray:
    """Ingredient j alone, in every component."""
    return subset(K, C, [j])


def uniform(K: int, C: int) -> np.ndarray:
    return np.full((K, C), 1.0 / K)


def subset(K: int, C: int, indices: Sequence[int]) -> np.ndarray:
    """The uniform soup of ``indices``: 1/|S| on each of them, 0 elsewhere."""
    chosen = sorted(set(int(i) for i in indices))
    if not chosen or chosen[0] < 0 or chosen[-1] >= K:
        raise MixtureError(f"subset {list(indices)} must name ingredients in 0..{K - 1}")
    beta = np.zeros((K, C))
    beta[chosen] = 1.0 / len(chosen)
    return beta


def pairwise(beta_A: np.ndarray, lam: np.ndarray, j_new: int) -> np.ndarray:
    """``lam ⊙ A + (1 - lam) ⊙ C_j`` as a beta over all K: A is a mixture, C_j one ingredient."""
    lam = np.asarray(lam, dtype=np.float64)
    if lam.shape != (beta_A.shape[1],):
        raise MixtureError(f"lambda has shape {lam.shape}, expected ({beta_A.shape[1]},)")
    if ((lam < 0) | (lam > 1)).any() or not np.isfinite(lam).all():
        raise MixtureError(f"lambda must lie in [0, 1], got {lam}")
    beta = lam * beta_A
    beta[j_new] += 1.0 - lam
    return beta


def lambdas_to_beta(lambdas: Sequence[np.ndarray], chosen: Sequence[int], K: int,
                    n_components: int | None = None) -> np.ndarray:
    """Phase 1's lambdas as a beta (ALGORITHM.md):
    beta[chosen[0]] = prod_t L[t];  beta[chosen[j]] = (1 - L[j-1]) * prod_{t>=j} L[t].
    ``n_components`` is needed only when there are no lambdas (a single ingredient)."""
    if len(lambdas) != len(chosen) - 1:
        raise MixtureError(f"{len(chosen)} chosen ingredients need {len(chosen) - 1} lambdas, got {len(lambdas)}")
    C = len(lambdas[0]) if lambdas else n_components
    if C is None:
        raise MixtureError("lambdas_to_beta: pass n_components when there are no lambdas")
    beta = np.zeros((K, C))
    for j, ingredient in enumerate(chosen):
        weight = np.ones(C) if j == 0 else 1.0 - np.asarray(lambdas[j - 1], dtype=np.float64)
        # multiply in the order phase 1 applied the lambdas: bit-identical to folding pairwise()
        for lam in lambdas[j:]:
            weight = np.asarray(lam, dtype=np.float64) * weight
        beta[ingredient] = weight
    return beta


def mu_to_beta(beta: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Phase 2's reweighting: beta'[j, c] = mu[j, c] * beta[j, c] / P_c, P_c = sum_j mu * beta."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.shape != beta.shape:
        raise MixtureError(f"mu has shape {mu.shape}, beta has {beta.shape}")
    if not (np.isfinite(mu).all() and (mu > 0).all()):
        raise MixtureError("mu must be finite and > 0")
    weighted = mu * beta
    return weighted / weighted.sum(axis=0)


# ---- the plain reference fusion -------------------------------------------------------------

def fuse_many(states: Iterable[tuple[int, dict[str, torch.Tensor]]], betas: Mapping[str, np.ndarray],
              components) -> dict[str, dict[str, torch.Tensor]]:
    """Several fused state dicts from one pass over the ingredients, slow and obvious (the
    evaluator has the fast one). ``states`` yields ``(row, state_dict)`` in increasing row order
    and may load each lazily: one ingredient is held at a time, plus one accumulator per
    mixture, so 72 ingredients fuse in the memory of a few models. Every row a mixture weights
    must come by. Tensors in no component (integer buffers) must agree across ingredients and
    are copied. Each tensor is summed in row order, so the result does not depend on which other
    rows or mixtures are in the pass."""
    betas = {name: validate(beta) for name, beta in betas.items()}
    shapes = {b.shape for b in betas.values()}
    if len(shapes) != 1:
        raise MixtureError(f"the mixtures' betas differ in shape: {sorted(shapes)}")
    (K, C), = shapes
    if len(components) != C:
        raise MixtureError(f"beta is {K}x{C} but there are {len(components)} components")
    needed = {int(j) for b in betas.values() for j in np.flatnonzero(b.any(axis=1))}
    reference: dict[str, torch.Tensor] = {}  # the first ingredient's shared tensors and dtypes
    owner: dict[str, int] = {}
    totals: dict[str, dict[str, torch.Tensor]] = {name: {} for name in betas}
    seen: list[int] = []
    for j, sd in states:
        if not 0 <= j < K or (seen and j <= seen[-1]):
            raise MixtureError(f"ingredient rows must increase within [0, {K}): got {j} after {seen[-1:]}")
        if not seen:
            owner = tensor_owners(components, set(sd), unknown="which ingredient 0 does not have")
            reference = {name: t if name not in owner else t.new_empty(0) for name, t in sd.items()}
            shape_of = {name: t.shape for name, t in sd.items()}
        seen.append(j)
        for name, shape in shape_of.items():
            t = sd.get(name)
            if t is None or t.shape != shape:
                raise MixtureError(f"ingredient {j}: tensor {name!r} is missing or has another shape than "
                                   f"ingredient {seen[0]}'s")
            if name not in owner:
                if not torch.equal(t, reference[name]):
                    raise MixtureError(f"tensor {name!r} is in no component but differs between ingredients")
                continue
            acc_dtype = torch.float64 if reference[name].dtype == torch.float64 else torch.float32
            for method, beta in betas.items():
                total = totals[method].setdefault(name, torch.zeros(shape, dtype=acc_dtype))
                w = beta[j, owner[name]]
                if w != 0.0:  # an absent ingredient costs nothing (and 0 * inf cannot poison the sum)
                    total += float(w) * t.to(acc_dtype)
        sd = t = None  # hold one ingredient at a time
    if not seen:
        raise MixtureError("no ingredients to fuse")
    missing = sorted(needed - set(seen))
    if missing:
        raise MixtureError(f"ingredients {missing} are weighted but were not given")
    return {method: {name: totals[method][name].to(reference[name].dtype) if name in owner
                     else reference[name].clone() for name in shape_of}
            for method in betas}


def fuse(state_dicts: Sequence[dict[str, torch.Tensor]], beta, components) -> dict[str, torch.Tensor]:
    """The fused state dict of one mixture over all of ``state_dicts`` (see ``fuse_many``)."""
    beta = validate(beta)
    if len(state_dicts) != beta.shape[0]:
        raise MixtureError(f"beta is {beta.shape[0]}x{beta.shape[1]} but there are {len(state_dicts)} ingredients")
    return fuse_many(enumerate(state_dicts), {"fused": beta}, components)["fused"]
