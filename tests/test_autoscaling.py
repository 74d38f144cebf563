"""An autoscaling cluster (issue "multi-node"): a head with no CPUs for work, whose autoscaler
launches worker nodes through Ray's fake node provider (``fake_multi_node``: real raylets on
this machine, the provider Ray's own autoscaler tests use) when the run asks for CPUs, and
removes them when idle. A demo-sized run (output on the moto S3 server) passes the dry run
with ``ray.autoscaling=true`` while only the head exists, is submitted to the head's job server
(``JobSubmissionClient``, token auth) and succeeds, trains and soups on nodes the autoscaler
added for it, publishes the same result as a one-node run, and after it the
autoscaler removes every worker for idleness. The job runs in its own process
(tests/autoscaling_job.py): one Ray per process; the head's processes belong to this test (its
own process group and temp dir), never a machine-wide ``ray stop``."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from autoscaling_job import DRIVER_ENV, HEAD_NODE_ID, MAX_WORKERS, WORKER_TYPE, start_head, stop_head
from conftest import copy_prepared

HERE = os.path.dirname(os.path.abspath(__file__))


def log_tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f"--- {path}\n{f.read()[-n:]}"
    except OSError as e:
        return f"--- {path}: {e}"


def autoscaler_events(temp_dir: str) -> dict:
    """What the head's autoscaler monitor logged: the node launches, and each worker it
    terminated with its reason ("idle" when it found the node idle past idle_timeout_minutes)."""
    launched, terminated = [], {}
    with open(os.path.join(temp_dir, "session_latest", "logs", "monitor.log"), errors="replace") as f:
        for line in f:
            if ":event_summary:Adding" in line:
                launched.append(line.split(":event_summary:", 1)[1].strip())
            found = re.search(r"Terminating the node with id (\w+) and ip \S+ \((\w+)\)", line)
            if found:
                terminated[found.group(1)] = found.group(2)
    return {"launched": launched, "terminated": terminated}


@pytest.fixture(scope="module")
def autoscaling_run(s3_bucket, one_node_run):
    # a short temp dir: Ray's unix socket paths under it must stay within 107 characters; the
    # head starts after the moto server, so every node's workers inherit AWS_ENDPOINT_URL
    temp_dir = tempfile.mkdtemp(prefix="fsas-", dir="/tmp")
    copy_prepared(one_node_run[0], f"{s3_bucket}/autoscaling")  # prepare runs in the driver alone
    t0 = time.time()
    head = start_head(temp_dir)
    print(f"autoscaling head up in {time.time() - t0:.1f}s")
    ok = False
    try:
        out = os.path.join(temp_dir, "result.json")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(DRIVER_ENV)
        proc = subprocess.run([sys.executable, os.path.join(HERE, "autoscaling_job.py"), head.address, head.dashboard,
                               f"{s3_bucket}/autoscaling", "--cluster-config", head.config_path, "--out", out],
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        result = {}
        if os.path.exists(out):
            with open(out) as f:
                result = json.load(f)
        if proc.returncode != 0 or "final" not in result:
            pytest.fail(f"the job failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}\n"
                        + log_tail(os.path.join(temp_dir, "session_latest", "logs", "monitor.log")), pytrace=False)
        result["autoscaler"] = autoscaler_events(temp_dir)
        result["stages"] = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
        print(f"autoscaling dry run {result['dry_run']['seconds']}s; run: {result['run_seconds']}s, workers gone {result['scale_down_seconds']}s after it; "
              f"{result['stages']}; {result['autoscaler']}")
        ok = True
        return result
    finally:
        t0 = time.time()
        killed = stop_head(head)
        print(f"autoscaling head stopped in {time.time() - t0:.1f}s ({len(killed)} processes needed SIGKILL)")
        if ok:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"the autoscaling cluster's logs are kept in {temp_dir} (processes SIGKILLed: {killed})")


def test_the_autoscaler_adds_workers_for_the_run_and_removes_them_when_idle(autoscaling_run):
    r = autoscaling_run
    # the run was a Ray job submitted to the head's job server with the token, and it succeeded
    assert r["job"]["status"] == "SUCCEEDED", r["job"]
    # before the run: the head alone, with no CPU for work
    assert [n for n, s in r["before"].items() if s["alive"]] == [HEAD_NODE_ID], r["before"]
    # the dry run passes with only the head: the CPUs are the autoscaler's to add, from worker
    # types of the cluster's own autoscaling config
    assert r["dry_run"]["ok"], r["dry_run"]["lines"]
    lines = "\n".join(r["dry_run"]["lines"])
    assert "no node has it now; the autoscaler must add one" in lines, lines
    assert f"finetune trials: up to 1 x {WORKER_TYPE} (2 at once, 2 per node)" in lines, lines

    # every trial and every soup evaluator ran on a worker the autoscaler added for this run
    added = set(r["final"]) - set(r["before"])
    trial_nodes = {t["node_id"] for t in r["trials"]}
    evaluator_nodes = set(r["report"]["evaluations"]["evaluator_nodes"])
    assert len(r["trials"]) == 2 and evaluator_nodes, (r["trials"], evaluator_nodes)
    assert trial_nodes <= added and evaluator_nodes <= added, (trial_nodes, evaluator_nodes, added)
    assert HEAD_NODE_ID not in trial_nodes | evaluator_nodes
    # a trial held half a CPU and half a (logical) GPU, as configured, and computed on the CPU;
    # two trials on one node shared its GPU
    for t in r["trials"]:
        assert (t["placement"]["cpus"], t["placement"]["gpus"], t["placement"]["device"]) == (0.5, 0.5, "cpu"), t
    if len(trial_nodes) == 1:
        assert len({t["placement"]["gpu_ids"] for t in r["trials"]}) == 1, r["trials"]
    assert len([n for n, s in r["after_run"].items() if s["alive"]]) <= 1 + MAX_WORKERS
    # loopback only: the head and every worker it launched
    assert {s["ip"] for s in r["final"].values()} == {"127.0.0.1"}, r["final"]

    # after the run: the autoscaler terminated every worker it added, each one that worked because
    # it was idle, and they went gracefully; the head remains. (Autoscaler v1 may launch one
    # node too many while the first are still starting, and terminates it at once as over
    # the type's max_workers.)
    assert [n for n, s in r["final"].items() if s["alive"]] == [HEAD_NODE_ID], (r["scale_down_seconds"], r["final"])
    terminated = r["autoscaler"]["terminated"]
    assert set(terminated) == added, r["autoscaler"]
    assert all(terminated[n] == "idle" for n in trial_nodes | evaluator_nodes), r["autoscaler"]
    assert set(terminated.values()) <= {"idle", "max_workers_per_type"}, r["autoscaler"]
    assert all(r["final"][n]["death"] == "EXPECTED_TERMINATION" for n in added), r["final"]


def test_the_result_equals_the_one_node_run(autoscaling_run, one_node_reference):
    assert autoscaling_run["report"]["methods"] == one_node_reference["methods"]
    assert autoscaling_run["report"]["ingredient_scores"] == one_node_reference["ingredient_scores"]
