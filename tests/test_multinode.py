"""Many nodes on one machine (issue 12): a demo-sized run on a 3-node ray.cluster_utils.Cluster
(a head with no work CPUs + two workers of 1 CPU and 1 logical GPU, output on the moto S3
server) spreads trials (a whole GPU each) and soup evaluators (half a GPU) over both workers and publishes the same fused model as a one-node run; losing
a worker node mid-finetune, mid-evaluate and mid-soup changes nothing but where work ran; a
local output_uri on that cluster is refused before anything is written. The cluster runs in its
own process (tests/multinode_job.py): one Ray per process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import copy_prepared

HERE = os.path.dirname(os.path.abspath(__file__))


def job(tmp_path, output_uri: str, *flags: str) -> dict:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "multinode_job.py"), output_uri, "--out", str(out),
                           *flags], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_node(one_node_reference):
    """The same config on the session's one-node Ray."""
    return one_node_reference


@pytest.fixture(scope="module")
def cluster_runs(s3_bucket, tmp_path_factory, one_node_run):
    tmp = tmp_path_factory.mktemp("multinode")
    for run in ("plain", "lose"):  # both start at finetune: prepare runs in the driver alone
        copy_prepared(one_node_run[0], f"{s3_bucket}/multinode/{run}")
    result = job(tmp, f"{s3_bucket}/multinode", "--lose", "--local-refused", str(tmp / "local-out"))
    result["local"] = str(tmp / "local-out")
    return result


def test_work_spreads_over_both_workers_and_gives_the_one_node_result(cluster_runs, one_node):
    plain = cluster_runs["plain"]
    workers = set(cluster_runs["workers"])
    trial_nodes = {t["node_id"] for t in plain["trials"]}
    evaluator_nodes = set(plain["report"]["evaluations"]["evaluator_nodes"])
    # one trial and one soup evaluator on each worker; nothing on the head (it has no work CPUs)
    assert trial_nodes == workers and evaluator_nodes == workers, (trial_nodes, evaluator_nodes, workers)
    # each worker has one logical GPU and no CUDA device: a trial held a whole GPU and a soup
    # evaluator half of one, as configured, and both computed on the CPU
    for t in plain["trials"]:
        assert t["placement"]["gpus"] == 1.0 and t["placement"]["gpu_ids"] != "", t
        assert t["placement"]["device"] == "cpu" and t["placement"]["cpus"] == 1.0, t
    evaluators = plain["report"]["evaluations"]["evaluators"]
    assert {e["node_id"] for e in evaluators} == workers
    assert all(e["gpus"] == 0.5 and e["gpu_ids"] != "" and e["device"] == "cpu" for e in evaluators), evaluators
    assert plain["report"]["methods"] == one_node["methods"]


def test_a_lost_node_changes_where_work_ran_not_the_result(cluster_runs, one_node):
    lose = cluster_runs["lose"]
    assert [k["stage"] for k in lose["killed"]] == ["finetune", "evaluate", "soup"]
    lost = lose["killed"][0]["removed"]
    resumed = [t for t in lose["trials"] if t["restored_from_epoch"] > 0]
    # the trial on the lost node went on from its epoch-1 checkpoint on another node; the other
    # trial was untouched
    assert len(resumed) >= 1 and all(t["node_id"] != lost for t in resumed)
    assert any(t["restored_from_epoch"] == 0 for t in lose["trials"])
    # evaluate: Ray Data redid the lost blocks; score_splits refuses a split with rows missing or
    # counted twice, and every count equals the one-node run's
    assert lose["report"]["methods"] == one_node["methods"]
    assert lose["report"]["ingredient_scores"] == one_node["ingredient_scores"]


def test_a_local_output_uri_on_several_nodes_is_refused(cluster_runs):
    assert cluster_runs["refused"].startswith("SharedStorageError: output_uri")
    assert "s3://" in cluster_runs["refused"] and "storage.shared" in cluster_runs["refused"]
    assert not os.path.exists(cluster_runs["local"])  # nothing written
