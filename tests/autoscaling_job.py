"""A demo-sized frankensoup run on an autoscaling Ray cluster on this machine: Ray's fake node
provider (what ray.cluster_utils.AutoscalingCluster uses) with one worker type, min 0 / max 2,
started with its own port and temp dir (AutoscalingCluster.start would `ray stop` every Ray of
the machine). Records the alive worker nodes while the pipeline runs and after it, until the
idle workers are released. Run by tests/test_autoscaling.py; writes JSON to ``--out``.

    python tests/autoscaling_job.py OUTPUT_URI --out result.json
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time

import yaml

sys.path.insert(0, os.path.dirname(__file__))

from conftest import TINY_OVERRIDES  # noqa: E402

IDLE_TIMEOUT_S = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_config(node_ip: str, port: int) -> dict:
    """An autoscaler config for Ray's fake node provider: nodes are raylets on this machine."""
    return {
        "cluster_name": "frankensoup-autoscaling-test",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {"type": "fake_multinode", "gcs_address": f"{node_ip}:{port}"},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("output_uri")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="fsa-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token_path = os.path.join(tmp, "token")  # token authentication stays on, as on a real cluster
    with open(token_path, "w") as f:
        f.write(secrets.token_hex(32))
    # before Ray is imported: this driver reads the token as the cluster's processes do
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    port = free_port()
    node_ip = ray.util.get_node_ip_address()
    config_path = os.path.join(tmp, "autoscaler.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(cluster_config(node_ip, port), f)
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={tmp}/ray",
                    f"--autoscaling-config={config_path}", "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    result: dict = {"samples": []}
    try:
        result.update(run(args.output_uri, f"{node_ip}:{port}", result["samples"]))
    finally:
        with open(args.out, "w") as f:
            json.dump(result, f)
        stop(tmp)
    return 0


def workers_alive(ray) -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


def run(output_uri: str, address: str, samples: list) -> dict:
    import ray

    from pipeline.config import load_config
    from pipeline.run import run_all

    cfg = load_config(None, [*TINY_OVERRIDES, f"output_uri={output_uri}", f"ray.address={address}",
                             "ray.num_cpus=null", "ray.autoscaling=true", "soup.phase2.enabled=false"])
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    before = workers_alive(ray)
    done = threading.Event()

    def watch():
        while not done.is_set():
            samples.append([time.time(), workers_alive(ray)])
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.time()
    report = run_all(cfg, log=print)
    seconds = time.time() - t0
    deadline = time.time() + 120  # idle workers go after IDLE_TIMEOUT_S plus the autoscaler's rounds
    while time.time() < deadline and workers_alive(ray) > 0:
        time.sleep(1)
    done.set()
    watcher.join()
    return {"workers_before": before, "workers_peak": max(n for _, n in samples), "seconds": seconds,
            "workers_after": workers_alive(ray), "mmms_val": report["methods"]["mmms"]["val"]}


def stop(tmp: str) -> None:
    """Stop only this cluster's processes (never `ray stop`, which stops every Ray here)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if any(tmp in part for part in (p.info["cmdline"] or []))]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


if __name__ == "__main__":
    sys.exit(main())
