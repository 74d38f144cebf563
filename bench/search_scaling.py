"""Phase 1's wall time against the number of evaluators E, through the real Ray evaluator pool,
with a stand-in for the val forward pass (no GPU needed).

Each evaluator actor answers with a fixed function of beta (bench/standin.py: K = 72
ingredients whose decisions look like the reference's log: most short-circuited, a few joining)
and sleeps as a val pass would take: a shard task of m images takes ``fixed + m * per_image``.
The split of one evaluation's ``--latency`` between the two is measured on a real
``MixtureEvaluator`` with a random ViT-B-32 on this machine's CPU (``--measure``: two rows
mixed, the fixed part = fusing + launching, the per-image part = the forward pass), or given
with ``--fixed-fraction``; the run prints which. So the scaling shown is the search's and the
sharding's, not this machine's cores'.

The paper's search (NGOpt -> Cobyla, W = 1) runs serially at E = 1 (S = 1) and at each other E
with S = E val shards per evaluation plus speculation; CMA with W = 4 likewise unless
--skip-cma. Each row prints the wall time, the speed-up over E = 1, the evaluator-busy seconds
and whether the result is identical to the in-process sequential search's (beta, val, chosen,
lambdas, decisions, trace).

The bound: with unlimited evaluators every evaluation runs as soon as the sequential search's
data dependencies allow, so phase 1 takes the critical path (the chain of joining candidates
plus the longest rejected candidate after each), each of its evaluations sharded over E
(``fixed + (latency - fixed) / E``). With E evaluators the wall time is also at least the work
/ E. bound_E = work / max(critical path, work / E), a speed-up.

    python bench/search_scaling.py                       # ~5 minutes
    python bench/search_scaling.py --latency 0.1 --evaluators 1,8 --skip-cma
Last line: speedup_E8=<x> bound_E8=<y> gpu_time_ratio=<busy s at E=8 / at E=1> identical=True
(the W = 1 search).
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
from standin import ReferenceLike, StandInHost

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


def measured_fixed_fraction(n_images: int = 26_000) -> float:
    """Of one evaluation of ``n_images`` on a random ViT-B-32 MixtureEvaluator (two rows mixed,
    this machine's CPU), the fraction that does not scale with the images: t(m) = fixed +
    m * per_image, from m = 4 and m = 12 images, medians of 3."""
    import statistics

    import torch

    from pipeline.evaluate.evaluator import MixtureEvaluator
    from pipeline.model import components, init_classifier

    torch.manual_seed(0)
    base = init_classifier("ViT-B-32", 1000)
    comps = components(base, 2)
    state = base.state_dict()
    other = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    images = torch.randn(12, 3, 224, 224)
    ev = MixtureEvaluator(base, [state, other], comps, images, torch.zeros(12, dtype=torch.long), device="cpu",
                          batch_size=4)
    rng = np.random.default_rng(0)

    def timed(m: int) -> float:
        times = []
        for _ in range(3):
            beta = rng.dirichlet(np.ones(2), size=len(comps)).T  # a new mixture: fused every time
            t0 = time.perf_counter()
            ev.score_shard(beta, 0, m)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t4, t12 = timed(4), timed(12)
    per_image = max((t12 - t4) / 8, 1e-9)
    fixed = max(t4 - 4 * per_image, 0.0)
    print(f"measured on this CPU, ViT-B-32 MixtureEvaluator, 2 rows: fixed {fixed * 1e3:.0f} ms per shard task, "
          f"{per_image * 1e3:.1f} ms per image -> fixed fraction of a {n_images}-image evaluation "
          f"{fixed / (fixed + n_images * per_image):.2e}")
    return fixed / (fixed + n_images * per_image)


def run_pool(args, cfg: SoupConfig, n_evaluators: int, val_accs) -> tuple[mmms.Phase1Result, float, float]:
    host = ray.remote(StandInHost)
    fixed = args.fixed_fraction * args.latency
    actors = [host.options(num_cpus=0).remote(args.K, args.C, args.seed, args.latency, batch_size=args.batch,
                                              fixed_s=fixed)
              for _ in range(n_evaluators)]
    shards = 1 if n_evaluators == 1 else n_evaluators
    with EvaluatorPool(actors, n_shards=shards) as pool:
        pool.wait_ready(n_evaluators)
        t0 = time.perf_counter()
        result = mmms.phase1(val_accs, args.C, pool, cfg)
        return result, time.perf_counter() - t0, pool.seconds


def bench(args, name: str, cfg: SoupConfig) -> dict:
    function = ReferenceLike(args.K, args.C, args.seed)
    reference, critical = sequential_rounds(function, cfg)
    work = reference.n_evals
    kinds = collections.Counter(o for _, o, _ in reference.decisions)
    fixed = args.fixed_fraction * args.latency
    print(f"\n{name}: K = {args.K}, C = {args.C}, {cfg.max_func_evals_per_dim} evaluations per dimension, "
          f"latency {args.latency * 1000:.0f} ms ({fixed * 1000:.3g} ms fixed); decisions: "
          f"{kinds['short-circuit']} short-circuited, {kinds['pass 1']} rejected after pass 1, {kinds['joined']} "
          f"joined; {work} evaluations in sequence, critical path {critical} rounds of W")
    print(f"{'E':>3} {'S':>3} {'wall s':>8} {'speed-up':>9} {'bound':>6} {'of bound':>9} {'evaluations':>12} "
          f"{'dropped':>8} {'busy s':>8}  identical")
    rows, base = {}, None
    for E in args.evaluators:
        result, wall, busy = run_pool(args, cfg, E, function.val_accs)
        base = (wall, busy) if base is None else base
        W = cfg.num_workers  # a round: W evaluations side by side, each sharded over E / W evaluators
        path = critical * (fixed + (args.latency - fixed) * W / E if E >= W else args.latency * -(-W // E))
        bound = work * args.latency / max(path, work * args.latency / E)
        speedup = base[0] / wall
        identical = same(result, reference)
        rows[E] = {"wall": wall, "speedup": speedup, "bound": bound, "identical": identical,
                   "busy_ratio": busy / base[1]}
        c = result.cost
        print(f"{E:>3} {1 if E == 1 else E:>3} {wall:>8.1f} {speedup:>9.2f} {bound:>6.2f} {speedup / bound:>9.2f} "
              f"{c['evaluations']:>12} {c['speculative_dropped']:>8} {busy:>8.1f}  {identical}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per evaluation")
    parser.add_argument("--evaluators", default="1,8")
    parser.add_argument("--K", type=int, default=72)
    parser.add_argument("--C", type=int, default=3)
    parser.add_argument("--evals-per-dim", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256, help="val batch size (shards are whole batches)")
    parser.add_argument("--fixed-fraction", type=float, default=None,
                        help="fraction of an evaluation that is fixed per shard task (default: --measure it)")
    parser.add_argument("--skip-cma", action="store_true")
    args = parser.parse_args()
    args.evaluators = sorted({int(e) for e in args.evaluators.split(",")} | {1})
    if args.fixed_fraction is None:
        args.fixed_fraction = measured_fixed_fraction()
    else:
        print(f"fixed fraction of an evaluation given: {args.fixed_fraction:.2e}")
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
    print(f"speedup_E8={e8['speedup']:.2f} bound_E8={e8['bound']:.2f} gpu_time_ratio={e8['busy_ratio']:.2f} "
          f"identical={all(r['identical'] for r in paper.values())}")


if __name__ == "__main__":
    main()
