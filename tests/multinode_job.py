"""A demo-sized frankensoup run on a Ray cluster of several nodes on this machine
(ray.cluster_utils.Cluster: a head with no work CPUs and two workers), run by
tests/test_multinode.py in its own process (one Ray per process). With ``--lose``, a worker
node is removed mid-finetune, mid-evaluate and mid-soup (a fresh one joins each time), as a
spot instance would vanish. With ``--local-refused PATH``, first a run with that local
output_uri, which the cluster must refuse. The runs go to OUTPUT_URI/plain and OUTPUT_URI/lose.
Writes what the test asserts on as JSON to ``--out``.

    python tests/multinode_job.py OUTPUT_URI --out result.json [--lose] [--local-refused PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from conftest import EVALUATED_OVERRIDES, tiny_config  # noqa: E402

# one CPU per worker: each holds one trial or one soup evaluator at a time, so work must spread
SETTINGS = (*EVALUATED_OVERRIDES, "finetune.num_trials=2", "finetune.space.epochs=[3]", "soup.num_evaluators=2",
            "soup.evaluator_resources.cpu=1", "evaluate.resources.cpu=0.5", "evaluate.batch_size=64",
            "finetune.max_failures=3", "soup.phase2.enabled=false", "data.demo.shifts=[noise]")
# and one logical GPU per worker (no CUDA device behind it): a trial takes a whole one, a soup
# evaluator and a Ray Data scorer half of one; resources never change a result
WORKER = {"num_cpus": 1, "num_gpus": 1}
GPU_SETTINGS = ("finetune.resources.gpu=1", "soup.evaluator_resources.gpu=0.5", "evaluate.resources.gpu=0.5")


def lose_a_node(cluster, name: str, node_id: str | None, log: list) -> None:
    """Remove a worker node without grace, as a lost spot instance (the one with ``node_id``
    when given), and let a fresh one join so the cluster keeps two workers."""
    workers = list(cluster.worker_nodes)
    victim = next((n for n in workers if n.node_id == node_id), workers[0])
    log.append({"stage": name, "removed": victim.node_id})
    cluster.remove_node(victim, allow_graceful=False)
    cluster.add_node(**WORKER)
    cluster.wait_for_nodes()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output_uri")
    p.add_argument("--out", required=True)
    p.add_argument("--lose", action="store_true")
    p.add_argument("--local-refused", metavar="LOCAL_PATH", help="first try a run with this local output_uri")
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    # the GCS declares a node that stopped answering dead after 2 missed 1 s health checks (Ray's
    # defaults take ~15 s), as Ray's own node-failure tests do: a lost node is noticed at once
    health = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2,
              "health_check_initial_delay_ms": 0}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": health})
    for _ in range(2):
        cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    result: dict = {"head": cluster.head_node.node_id,
                    "workers": [n.node_id for n in cluster.worker_nodes]}
    try:
        if args.local_refused:
            # first, a local output_uri the workers do not share: refused before anything is written
            from pipeline.run import run_all

            cfg = tiny_config(args.local_refused, *SETTINGS, f"ray.address={cluster.address}")
            try:
                run_all(cfg, log=lambda *_: None)
                result["refused"] = None
            except Exception as e:  # the test asserts on the class and message
                result["refused"] = f"{type(e).__name__}: {e}"
        # the same config twice in one cluster: as it is, then losing a node in each stage
        on_cluster = (*SETTINGS, *GPU_SETTINGS, f"ray.address={cluster.address}")
        result["plain"] = run(tiny_config(f"{args.output_uri}/plain", *on_cluster), cluster, lose=False)
        if args.lose:
            result["lose"] = run(tiny_config(f"{args.output_uri}/lose", *on_cluster), cluster, lose=True)
    finally:
        with open(args.out, "w") as f:
            json.dump(result, f)
        ray.shutdown()
        cluster.shutdown()
    return 0


def run(cfg, cluster, lose: bool) -> dict:
    from pipeline import layout, storage
    from pipeline.ingredients import read_registry
    from pipeline.run import run_all
    from pipeline.soup import pool as pool_lib

    killed: list = []
    if lose:
        # each loss happens from the driver's own thread at a known point of a stage
        from pipeline.evaluate import stage as evaluate_stage
        from pipeline.finetune import sweep

        on_result = sweep.TrialLog.on_trial_result

        def result_then_loss(self, iteration, trials, trial, result, **info):
            on_result(self, iteration, trials, trial, result, **info)
            if not any(k["stage"] == "finetune" for k in killed) and result.get("epoch") == 2:
                # Tune has registered this trial's epoch-1 checkpoint (epoch 2's is registered only
                # after the callbacks): its node goes, it must resume elsewhere from a checkpoint
                lose_a_node(cluster, "finetune", result.get("node_id"), killed)

        sweep.TrialLog.on_trial_result = result_then_loss
        original_scoring = evaluate_stage.score_with_memo

        def scoring_with_loss(cfg_, memo, models, splits, class_names, progress=None, **kw):
            def tick(done, total):
                if not any(k["stage"] == "evaluate" for k in killed):
                    lose_a_node(cluster, "evaluate", None, killed)  # blocks in flight are lost with it
                if progress is not None:
                    progress(done, total)

            return original_scoring(cfg_, memo, models, splits, class_names, progress=tick, **kw)

        evaluate_stage.score_with_memo = scoring_with_loss  # the evaluate stage's scoring, not the soup's
    original_pool = pool_lib.evaluator_pool
    calls: list = []

    def pool_of_all_evaluators(*a, **k):
        pool = original_pool(*a, **k)
        pool.wait_ready(cfg.soup.num_evaluators)  # every evaluator placed before the search, so all are recorded
        call = pool.__call__

        submit = pool.submit

        class Losing(type(pool)):
            def _maybe_lose(self):
                calls.append(self.evaluations)
                if lose and not any(x["stage"] == "soup" for x in killed):
                    # the node of an evaluator goes as the search hands it work: the mixtures it
                    # gets fail with it and go to the other evaluator
                    lose_a_node(cluster, "soup", self.infos[0]["node_id"], killed)

            def __call__(self, betas):
                self._maybe_lose()
                return call(betas)

            def submit(self, beta, threshold=None, priority=0):
                self._maybe_lose()
                return submit(beta, threshold, priority)

        pool.__class__ = Losing
        return pool

    pool_lib.evaluator_pool = pool_of_all_evaluators
    try:
        report = run_all(cfg, log=print)
    finally:
        pool_lib.evaluator_pool = original_pool
    rows = read_registry(cfg)["ingredients"]
    return {"report": report, "killed": killed, "pool_calls": calls,
            "trials": [{k: r.get(k) for k in ("id", "node_id", "placement", "restored_from_epoch", "sha256")}
                       for r in rows],
            "run": storage.read_json(layout.run_record_uri(cfg))}


if __name__ == "__main__":
    sys.exit(main())
