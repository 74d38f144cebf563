"""Phase 1's wall time against the number of evaluators E, through the real Ray evaluator pool,
with a stand-in for the val forward pass (no GPU needed).

Each evaluator actor answers with a fixed function of beta (pipeline/soup/standin.py: K = 72
ingredients whose decisions look like the reference's log: most short-circuited, a few joining)
after a fixed latency per evaluation, so the scaling shown is the search's, not this machine's
cores'. For E = 1, 2, 4, 8, 16 it prints the wall time, the speed-up over E = 1 and whether the
result is identical to E = 1's (beta, val, chosen, lambdas, decisions, trace), for the paper's
search (NGOpt -> Cobyla, W = 1) and for CMA with W = 4.

The bound: with unlimited evaluators, every evaluation runs as soon as the sequential search's
data dependencies allow (a candidate's batches one after another, from the moment the soup it
is tried against is known), so phase 1 takes the critical path: the chain of joining candidates
plus the longest rejected candidate after each. With E evaluators the wall time is also at least
the sequential work / E. bound_E = sequential work / max(critical path, work / E), a speed-up.

    python bench/search_scaling.py                 # ~6 minutes
    python bench/search_scaling.py --latency 0.02 --evaluators 1,2,8
Last line: speedup_E8=<x> bound_E8=<y> identical=True (the W = 1 search).
"""
from __future__ import annotations

import argparse
import collections
import time
import warnings

import numpy as np
import ray

from pipeline.config import SoupConfig
from pipeline.soup import mmms
from pipeline.soup.pool import EvaluatorPool
from pipeline.soup.standin import ReferenceLike, StandInHost

warnings.filterwarnings("ignore", message="COBYLA")


def sequential_rounds(function: ReferenceLike, cfg: SoupConfig) -> tuple[mmms.Phase1Result, int]:
    """The sequential search in-process, and its critical path in rounds (one round = one
    latency: a batch of <= W mixtures evaluated side by side)."""
    seen: list[dict] = []
    result = mmms.phase1(function.val_accs, function.C, function, cfg, progress=seen.append)
    rounds = collections.Counter(p["ingredient"] for p in seen[1:])  # seen[0] is the start
    soup_ready = end = 1  # the start's one evaluation
    for j, outcome, _ in result.decisions:
        end = max(end, soup_ready + rounds[j])
        if outcome == "joined":
            soup_ready += rounds[j]  # the next soup is known once this candidate has joined
    return result, end


def same(a: mmms.Phase1Result, b: mmms.Phase1Result) -> bool:
    return (np.array_equal(a.beta, b.beta) and a.val_acc == b.val_acc and a.chosen == b.chosen
            and all(np.array_equal(x, y) for x, y in zip(a.lambdas, b.lambdas)) and len(a.lambdas) == len(b.lambdas)
            and a.decisions == b.decisions and a.trace == b.trace and a.n_evals == b.n_evals)


def run_pool(args, cfg: SoupConfig, n_evaluators: int, val_accs) -> tuple[mmms.Phase1Result, float]:
    host = ray.remote(StandInHost)
    actors = [host.options(num_cpus=0).remote(args.K, args.C, args.seed, args.latency) for _ in range(n_evaluators)]
    with EvaluatorPool(actors) as pool:
        pool.wait_ready(n_evaluators)
        t0 = time.perf_counter()
        result = mmms.phase1(val_accs, args.C, pool, cfg)
        return result, time.perf_counter() - t0


def bench(args, name: str, cfg: SoupConfig) -> dict:
    function = ReferenceLike(args.K, args.C, args.seed)
    reference, critical = sequential_rounds(function, cfg)
    work = reference.n_evals
    kinds = collections.Counter(o for _, o, _ in reference.decisions)
    print(f"\n{name}: K = {args.K}, C = {args.C}, {cfg.max_func_evals_per_dim} evaluations per dimension, "
          f"latency {args.latency * 1000:.0f} ms; decisions: {kinds['short-circuit']} short-circuited, "
          f"{kinds['pass 1']} rejected after pass 1, {kinds['joined']} joined; {work} evaluations in sequence, "
          f"critical path {critical} rounds = {critical * args.latency:.1f}s")
    print(f"{'E':>3} {'wall s':>8} {'speed-up':>9} {'bound':>6} {'of bound':>9} {'evaluations':>12} "
          f"{'dropped':>8} {'busy':>6}  identical")
    rows, base = {}, None
    for E in args.evaluators:
        result, wall = run_pool(args, cfg, E, function.val_accs)
        base = wall if base is None else base
        bound = work / max(critical, work / E)
        speedup = base / wall
        identical = same(result, reference)
        rows[E] = {"wall": wall, "speedup": speedup, "bound": bound, "identical": identical}
        c = result.cost
        print(f"{E:>3} {wall:>8.1f} {speedup:>9.2f} {bound:>6.2f} {speedup / bound:>9.2f} {c['evaluations']:>12} "
              f"{c['speculative_dropped']:>8} {c['busy_fraction']:>6.2f}  {identical}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per evaluation")
    parser.add_argument("--evaluators", default="1,2,4,8,16")
    parser.add_argument("--K", type=int, default=72)
    parser.add_argument("--C", type=int, default=3)
    parser.add_argument("--evals-per-dim", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--skip-cma", action="store_true")
    args = parser.parse_args()
    args.evaluators = sorted({int(e) for e in args.evaluators.split(",")} | {1})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        base = dict(max_func_evals_per_dim=args.evals_per_dim, seed=123456789)
        paper = bench(args, "NGOpt -> Cobyla, W = 1 (the paper's search)",
                      SoupConfig(optimizer="NGOpt", num_workers=1, **base))
        if not args.skip_cma:
            bench(args, "CMA, W = 4", SoupConfig(optimizer="CMA", num_workers=4, **base))
    finally:
        ray.shutdown()
    e8 = paper.get(8) or paper[max(paper)]
    print(f"speedup_E8={e8['speedup']:.2f} bound_E8={e8['bound']:.2f} "
          f"identical={all(r['identical'] for r in paper.values())}")


if __name__ == "__main__":
    main()
