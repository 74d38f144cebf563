"""Cluster use on one machine: a real head started with `ray start --head` (dashboard, job
server, metrics export, token authentication on), a `ray job submit`-style round trip of the
main job on a tiny config, and the dashboard metrics read back from the metrics endpoint."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import psutil
import pytest

from conftest import TINY_OVERRIDES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _kill_tree_using(marker: str) -> None:
    """Stop only this head's processes (never `ray stop`, which would stop every Ray here)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


@pytest.fixture(scope="module")
def ray_head():
    tmp = tempfile.mkdtemp(prefix="fsh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    token_path = os.path.join(tmp, "token")
    with open(token_path, "w") as f:
        f.write(token)
    gcs, dash, metrics, client, agent = _free_ports(5)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path,
               RAY_metrics_report_interval_ms="1000")
    env.pop("RAY_ADDRESS", None)
    cmd = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--temp-dir={tmp}/ray", "--num-cpus=2", "--disable-usage-stats"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        _kill_tree_using(tmp)
        raise RuntimeError(f"ray start failed: {out.stderr[-2000:]}")
    yield {"dashboard": f"http://127.0.0.1:{dash}", "metrics": f"http://127.0.0.1:{metrics}/metrics",
           "token": token, "env": env, "tmp": tmp}
    _kill_tree_using(tmp)


def _metric_values(text: str, name: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)]


def _series_labels(text: str, into: dict[str, set[str]]) -> dict[str, set[str]]:
    """frankensoup metric name -> the label names its series carry, added to ``into``."""
    for m in re.finditer(r"^(ray_frankensoup_\w+)\{([^}]*)\} ", text, re.M):
        into.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2)))
    return into


def _run_labels(text: str, into: dict[str, set[tuple[str, str]]]) -> dict[str, set[tuple[str, str]]]:
    """frankensoup metric name -> the (run, stage) label values its series carry, added to ``into``."""
    for m in re.finditer(r"^(ray_frankensoup_\w+)\{([^}]*)\} ", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        into.setdefault(m.group(1), set()).add((labels.get("run"), labels.get("stage")))
    return into


def _dashboard_queries() -> list[tuple[str, str]]:
    with open(os.path.join(REPO, "dashboards", "frankensoup.json")) as f:
        dashboard = json.load(f)
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def _check_dashboard(exported: dict[str, set[str]]) -> None:
    """Every panel's query names metrics the endpoint exported, grouped by labels they carry."""
    for title, expr in _dashboard_queries():
        names = re.findall(r"\bray_frankensoup_\w+", expr)
        assert names, (title, expr)
        for name in names:
            assert name in exported, f"panel {title!r}: {name} not exported (exported: {sorted(exported)})"
            for group in re.findall(r"by \(([^)]*)\)", expr):
                labels = {g.strip() for g in group.split(",")}
                assert labels <= exported[name], f"panel {title!r}: {name} lacks labels {labels - exported[name]}"


def test_job_submission_requires_the_token(ray_head):
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception):
        env_backup = {k: os.environ.pop(k, None) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
        try:
            JobSubmissionClient(ray_head["dashboard"]).submit_job(entrypoint="python -c 'print(1)'")
        finally:
            os.environ.update({k: v for k, v in env_backup.items() if v is not None})


def test_job_submit_round_trip_with_metrics(ray_head, prepared_demo, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head["dashboard"], headers={"Authorization": f"Bearer {ray_head['token']}"})
    out = tmp_path / "job-output"
    # the session's prepared demo (the same tiny config): the job reuses prepare by content key
    # and runs finetune, evaluate and soup, whose metrics the dashboard shows
    shutil.copytree(prepared_demo.output_uri, out)
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("ray.")] + [f"output_uri={out}"]
    entry = "python -m pipeline run " + " ".join(f"--set {o}" for o in overrides)
    job = client.submit_job(entrypoint=entry, runtime_env={"working_dir": REPO,
                                                           "excludes": [".git", "frankensoup-output", "*.ipynb"]})
    seen: dict[str, list[float]] = {}
    exported: dict[str, set[str]] = {}
    runs: dict[str, set[tuple[str, str]]] = {}
    names = ["ray_frankensoup_soup_evaluations_total", "ray_frankensoup_soup_best_val_accuracy",
             "ray_frankensoup_trials_finished", "ray_frankensoup_soup_eval_latency_seconds_count"]
    deadline = time.time() + 900
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job)
        try:
            text = urllib.request.urlopen(ray_head["metrics"], timeout=5).read().decode()
            _series_labels(text, exported)
            _run_labels(text, runs)
            for n in names:
                vals = _metric_values(text, n)
                if vals:
                    seen[n] = vals
        except OSError:
            pass
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "mmms" in logs and (out / "soup" / "LATEST").exists()
    # a healthy run says nothing at ERROR or WARNING level: Python logging's level names, and
    # Ray's C++ lines ("[2026-11-30 16:50:17,881 E 31655 31655] core_worker.cc:...")
    alarms = [line for line in logs.splitlines()
              if re.search(r"\b(ERROR|WARNING|CRITICAL)\b|\[\d{4}-\d\d-\d\d [\d:,]+ [EWF] \d+ \d+\]", line)]
    assert alarms == [], "\n".join(alarms)
    # the dashboard saw the run: evaluations counted, a best val accuracy, trials finished
    assert max(seen.get("ray_frankensoup_soup_evaluations_total", [0])) > 0, sorted(seen)
    assert 0 < max(seen.get("ray_frankensoup_soup_best_val_accuracy", [0])) <= 1, sorted(seen)
    assert max(seen.get("ray_frankensoup_trials_finished", [0])) >= 1, sorted(seen)
    assert max(seen.get("ray_frankensoup_soup_eval_latency_seconds_count", [0])) > 0, sorted(seen)
    # one selection shows this command: every panel's metric, the evaluator actors' included, has
    # series labelled with the run id the command made (run.json's "run") and the stage they measure
    run = json.loads((out / "run.json").read_text())["run"]
    panel_names = {n for _, expr in _dashboard_queries() for n in re.findall(r"\bray_frankensoup_\w+", expr)}
    stages = {n: {stage for r, stage in runs.get(n, ()) if r == run} for n in panel_names}
    assert all(stages.values()), f"no series labelled run={run}: {sorted(n for n, s in stages.items() if not s)}"
    assert stages["ray_frankensoup_trials_finished"] == {"finetune"}
    assert stages["ray_frankensoup_evaluator_busy_seconds_total"] == {"soup"}
    assert stages["ray_frankensoup_soup_evaluations_total"] == {"soup"}

    # the evaluator actors' metrics, from a stand-in actor recording them as an evaluator does
    standin = client.submit_job(entrypoint="python tests/cluster_evaluator_standin.py",
                                runtime_env={"working_dir": REPO, "excludes": [".git", "frankensoup-output", "*.ipynb"]})
    deadline = time.time() + 120
    try:
        while time.time() < deadline and "ray_frankensoup_evaluator_busy_seconds_total" not in exported:
            assert client.get_job_status(standin) not in (JobStatus.FAILED, JobStatus.STOPPED), \
                client.get_job_logs(standin)[-3000:]
            try:
                _series_labels(urllib.request.urlopen(ray_head["metrics"], timeout=5).read().decode(), exported)
            except OSError:
                pass
            time.sleep(1)
    finally:
        client.stop_job(standin)
    _check_dashboard(exported)
