"""A demo-sized frankensoup run on an autoscaling Ray cluster on this machine, run by
tests/test_autoscaling.py in its own process (one Ray per process).

The cluster is a head with no CPUs for work plus Ray's fake node provider
(``ray.autoscaler._private.fake_multi_node``, the provider Ray's own autoscaler tests use): the
autoscaler monitor on the head launches each worker node as raylet processes on this machine
when demand asks for CPUs the head lacks, and terminates it when it has been idle for
``idle_timeout_minutes``. ``start_head``/``stop_head`` own the head's processes (its own process
group and temp dir; never ``ray stop``); ``main`` checks the cluster has only the head,
dry-runs the config against it, submits the run to the head's job server as a user would
(``JobSubmissionClient``, token auth), waits for it to end, then watches the autoscaler remove the worker nodes. Writes what the test asserts on as
JSON to ``--out``.

    python tests/autoscaling_job.py GCS_ADDRESS DASHBOARD_URL OUTPUT_URI --cluster-config PATH --out result.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(__file__))

# the fake provider's fixed ids: the head is ...00000, the workers it launches ...00001, ...00002
HEAD_NODE_ID = "f" * 51 + "00000"
WORKER_TYPE = "gpu_worker"
WORKER_RESOURCES = {"CPU": 1, "GPU": 1}  # a logical GPU: the fake node has no CUDA device behind it
MAX_WORKERS = 2
# a trial takes half a CPU and half a GPU, so the 2-trial sweep packs onto one worker (two
# trials share its GPU); a soup evaluator takes a whole CPU, so the 2 evaluators need both
# workers; a short idle timeout so the test sees them go (Ray's default is 5 minutes)
TRIAL_SETTINGS = ("finetune.resources.cpu=0.5", "finetune.resources.gpu=0.5")
IDLE_TIMEOUT_MINUTES = 0.2
OBJECT_STORE_BYTES = 200 * 2**20

# Every Ray process of this cluster gets these: RAY_FAKE_CLUSTER lets the head's monitor load
# the fake provider and gives the head its fixed id; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes
# node IP detection answer loopback, so the worker nodes the monitor starts bind 127.0.0.1 as
# the head does (--node-ip-address) rather than this machine's network address.
CLUSTER_ENV = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "token",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# The job's: the head's token (~/.ray/auth_token, as `ray start` set it up), and loopback as this
# machine's IP, else ray.init(address="127.0.0.1:...") swaps 127.0.0.1 for the machine's network
# address, where the head does not listen, and waits for the GCS there forever.
DRIVER_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_config(gcs_address: str) -> dict:
    """The autoscaler's cluster config for the fake provider (the fields of Ray's
    fake_multi_node/example.yaml, which the Ray wheel does not ship; written whole because the
    monitor reads it as is)."""
    return {
        "cluster_name": "frankensoup-autoscaling-test",
        "max_workers": MAX_WORKERS,
        "provider": {
            "type": "fake_multinode",
            # workers join this head (the provider's default is port 6379 on the machine's IP)
            "gcs_address": gcs_address,
            # every fake node has the same IP: the autoscaler tells them apart by node id
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {**WORKER_RESOURCES, "object_store_memory": OBJECT_STORE_BYTES},
                          "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@dataclass
class Head:
    proc: subprocess.Popen
    address: str      # the GCS address, 127.0.0.1:<port>
    dashboard: str    # the dashboard and job server, http://127.0.0.1:<port>
    temp_dir: str     # every node's session dir is under it (workers take the head's)
    config_path: str  # the autoscaling config (JSON, which is YAML: also the dry run's cluster_yaml)
    log_path: str


def start_head(temp_dir: str, timeout_s: float = 120.0) -> Head:
    """``ray start --head --block`` in its own process group, with its own temp dir (so it
    neither reads nor overwrites /tmp/ray/ray_current_cluster, which a bare ray.init() on this
    machine would follow) and every port chosen free. Returns once the head has written its
    address."""
    port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    config_path = os.path.join(temp_dir, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(cluster_config(address), f, indent=1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CLUSTER_ENV)
    cmd = ["ray", "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1",
           "--temp-dir", temp_dir, "--autoscaling-config", config_path, "--num-cpus", "0", "--num-gpus", "0",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           "--metrics-export-port", str(free_port()), "--disable-usage-stats", "--object-store-memory", str(OBJECT_STORE_BYTES),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    log_path = os.path.join(temp_dir, "head.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(proc, address, f"http://127.0.0.1:{dashboard_port}", temp_dir, config_path, log_path)
    written = os.path.join(temp_dir, "ray_current_cluster")
    deadline = time.time() + timeout_s
    while not os.path.exists(written):
        if proc.poll() is not None or time.time() > deadline:
            stop_head(head)
            with open(log_path) as f:
                raise RuntimeError(f"ray start --head did not come up (rc={proc.poll()}):\n{f.read()[-3000:]}")
        time.sleep(0.5)
    return head


def cluster_processes(head: Head) -> list[int]:
    """Ids of this cluster's live processes: those whose command line names its temp dir (the
    head's and the worker nodes' gcs_server, raylets, agents, monitor, log monitors) and those
    still in the head's process group (agents that renamed themselves ``ray::...``). A group id
    is not reused while a process is in the group, so every one of them is ours."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if stat[0] != "Z" and (head.temp_dir in cmdline or int(stat[2]) == head.proc.pid):
            pids.append(int(entry))
    return pids


def stop_head(head: Head, grace_s: float = 2.0) -> list[int]:
    """Stop this cluster only. SIGTERM to ``ray start --block`` shuts its node down in order
    (SIGTERM to its whole group at once leaves the raylet waiting for the GCS it lost); then
    SIGTERM to whatever of the cluster is still up (a worker node the autoscaler had not yet
    removed), and SIGKILL to what is left after ``grace_s``, as ``ray stop`` does machine-wide.
    Returns the ids that needed SIGKILL."""

    def signal_all(sig: int) -> list[int]:
        sent = []
        for pid in cluster_processes(head):
            try:
                os.kill(pid, sig)
                sent.append(pid)
            except ProcessLookupError:
                pass
        return sent

    def wait(until: float) -> None:
        while time.time() < until and (head.proc.poll() is None or cluster_processes(head)):
            time.sleep(0.5)

    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
    wait(time.time() + grace_s)
    if signal_all(signal.SIGTERM):
        wait(time.time() + grace_s)
    killed = signal_all(signal.SIGKILL)
    head.proc.wait(timeout=10)
    return killed


# ---- the job ------------------------------------------------------------------------------

def node_states(address: str) -> dict[str, dict]:
    """Every node the cluster's GCS knows, alive or dead: id -> state, IP, and for a dead one
    why it died (the autoscaler drains a node it removes and says why)."""
    from ray._raylet import GcsClient
    from ray.core.generated import common_pb2, gcs_pb2

    out = {}
    for node_id, info in GcsClient(address=address).get_all_node_info(timeout=30).items():
        row = {"alive": info.state == gcs_pb2.GcsNodeInfo.ALIVE, "ip": info.node_manager_address}
        if not row["alive"]:
            row["death"] = common_pb2.NodeDeathInfo.Reason.Name(info.death_info.reason)
            row["death_message"] = info.death_info.reason_message
        out[node_id.hex()] = row
    return out


def alive(states: dict[str, dict]) -> list[str]:
    return sorted(n for n, s in states.items() if s["alive"])


def submit_run(dashboard: str, overrides: list[str], timeout_s: float) -> dict:
    """``frankensoup run`` as a Ray job on the cluster (the entrypoint a user passes to ``ray job
    submit``); its status, seconds and logs once it ended."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)  # the token comes from RAY_AUTH_MODE=token and ~/.ray/auth_token
    entrypoint = "python -m pipeline run " + " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    t0 = time.time()
    # frankensoup is installed on every node, as ray_cluster.yaml's image does. No working_dir:
    # the fake nodes share the head's session dir on this machine, so a worker node dropping the
    # unpacked package once its own workers are done would delete the driver's cwd under it
    job = client.submit_job(entrypoint=entrypoint)
    status = client.get_job_status(job)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() - t0 < timeout_s:
        time.sleep(1)
        status = client.get_job_status(job)
    if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        client.stop_job(job)
    return {"id": job, "status": str(status.value), "seconds": round(time.time() - t0, 1),
            "logs": client.get_job_logs(job)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("dashboard")
    p.add_argument("output_uri")
    p.add_argument("--cluster-config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--scale-down-timeout", type=float, default=180.0)
    p.add_argument("--job-timeout", type=float, default=420.0)
    args = p.parse_args()

    from conftest import TINY_OVERRIDES
    from multinode_job import SETTINGS

    result: dict = {"head": HEAD_NODE_ID}
    try:
        deadline = time.time() + 60
        while True:  # the head's GCS answers before its raylet has registered
            try:
                states = node_states(args.address)
            except Exception:
                if time.time() > deadline:
                    raise
                states = {}
            if alive(states) or time.time() > deadline:
                break
            time.sleep(0.5)
        result["before"] = states

        import ray

        from pipeline.config import load_config
        from pipeline.ingredients import read_registry
        from pipeline.run import dry_run
        from pipeline.soup.publish import read_report

        # the tests' own ray.address=local would make the job start a Ray of its own
        tiny = [o for o in TINY_OVERRIDES if not o.startswith("ray.")]
        overrides = [*tiny, f"output_uri={args.output_uri}", *SETTINGS, *TRIAL_SETTINGS, "ray.autoscaling=true",
                     f"ray.cluster_yaml={args.cluster_config}"]
        lines: list[str] = []
        t0 = time.time()
        result["dry_run"] = {"ok": dry_run(load_config(None, [*overrides, f"ray.address={args.address}"]),
                                           log=lines.append), "lines": lines}
        ray.shutdown()  # the run is the job's driver, on the head, not this process
        result["dry_run"]["seconds"] = round(time.time() - t0, 1)
        job = submit_run(args.dashboard, overrides, args.job_timeout)
        print(job["logs"])
        job["logs"] = job["logs"][-3000:]
        result["job"] = job
        result["run_seconds"] = job["seconds"]
        cfg = load_config(None, overrides)
        result["report"] = read_report(cfg)
        result["trials"] = [{k: r.get(k) for k in ("id", "node_id", "placement")}
                            for r in read_registry(cfg)["ingredients"]]
        result["after_run"] = node_states(args.address)

        # the job's driver is gone: nothing asks for CPUs, the autoscaler should remove every worker
        t1 = time.time()
        while True:
            states = node_states(args.address)
            if alive(states) == [HEAD_NODE_ID] or time.time() - t1 > args.scale_down_timeout:
                break
            time.sleep(1)
        result["scale_down_seconds"] = round(time.time() - t1, 1)
        result["final"] = states
    finally:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
