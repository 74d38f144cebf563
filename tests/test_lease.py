"""One writer per output (pipeline/lease.py): a second writer waits or stops, a dead holder's
lease is taken over, and two soups started together compute one search and publish one LATEST.
Each on local disk and on the moto S3 server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import EVALUATED_OVERRIDES, clone_output, tiny_config, upload
from pipeline import layout, lease, storage

HOLD = """
import sys, time
from pipeline import lease
lease.acquire(sys.argv[1], "soup", ttl_s=float(sys.argv[2]), log=print)
print("held", flush=True)
time.sleep(600)
"""


def _holder(uri: str, ttl_s: float) -> subprocess.Popen:
    """Another process that takes the lease on ``uri`` and keeps beating until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, uri, str(ttl_s)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(lease.__file__))})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_stops_with_no_wait_and_a_killed_holders_lease_is_taken_over(storage_root):
    ttl = 5.0  # the holder beats every 1.25 s: fresh even on a loaded machine
    proc = _holder(storage_root, ttl)
    try:
        time.sleep(ttl)  # past one TTL: the holder's heartbeat keeps its lease fresh
        with pytest.raises(lease.LeaseBusy, match=rf"being written by soup on host .* pid {proc.pid} "):
            lease.acquire(storage_root, "run", ttl_s=ttl, wait=False, log=print)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines: list[str] = []
    held = lease.acquire(storage_root, "run", ttl_s=ttl, log=lines.append, poll_s=0.5)
    try:
        assert any(f"pid {proc.pid} " in line and "waiting" in line for line in lines), lines
        assert any(line.startswith(f"took over the lease on {storage_root} from soup on host")
                   and f"pid {proc.pid} " in line for line in lines), lines
        on_store = json.loads(storage.read_bytes(lease.lease_uri(storage_root)))
        assert on_store["pid"] == os.getpid() and on_store["token"] == held.holder["token"]
    finally:
        held.release()
    assert not storage.exists(lease.lease_uri(storage_root))


def test_only_one_of_many_contenders_holds_the_lease_at_a_time(storage_root):
    holding, most, lines = [0], [0], []
    guard = threading.Lock()

    def contender():
        with lease.holding(storage_root, "soup", ttl_s=30, log=lines.append):
            with guard:
                holding[0] += 1
                most[0] = max(most[0], holding[0])
            time.sleep(0.3)
            with guard:
                holding[0] -= 1

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert most[0] == 1 and not any(t.is_alive() for t in threads)
    assert not storage.exists(lease.lease_uri(storage_root))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_soups_started_together_compute_one_search_and_one_latest(evaluated_demo, ray_local, tmp_path, where,
                                                                      request):
    from pipeline.soup.stage import run_soup

    if where == "local":
        cfg = clone_output(evaluated_demo, tmp_path / "out", *EVALUATED_OVERRIDES)
    else:
        from pipeline.ingredients import read_registry, write_registry

        uri = f"{request.getfixturevalue('s3_bucket')}/two-soups"
        upload(evaluated_demo.output_uri, uri)
        cfg = tiny_config(uri, *EVALUATED_OVERRIDES)
        registry = read_registry(cfg)
        for row in registry["ingredients"]:  # the copied ingredients, not the local originals
            row["checkpoint_uri"] = layout.ingredient_uri(cfg, row["id"])
        write_registry(cfg, registry)
    logs: dict[str, list[str]] = {"first": [], "second": []}
    results: dict[str, tuple] = {}

    def soup(name: str) -> None:  # what `frankensoup soup` does (pipeline/cli.py)
        log = logs[name].append
        with lease.holding(cfg.output_uri, "soup", ttl_s=cfg.storage.lease_ttl_s, log=log):
            report = run_soup(cfg, log=log, show_table=False)
            results[name] = (report, layout.read_marker(cfg, "soup"))

    first = threading.Thread(target=soup, args=("first",))
    first.start()
    while not storage.exists(lease.lease_uri(cfg.output_uri)):
        time.sleep(0.05)
    second = threading.Thread(target=soup, args=("second",))
    second.start()
    first.join()
    second.join()
    print("\n".join(f"{name}: {line}" for name, lines in logs.items() for line in lines))
    (report1, marker1), (report2, marker2) = results["first"], results["second"]
    assert marker1["computed"] > 0 and marker2["computed"] == 0 and marker2["reused"] == 0
    assert any("is being written by soup on host" in line and "waiting" in line for line in logs["second"])
    assert report1["run_id"] == report2["run_id"] == storage.read_pointer(layout.latest_pointer(cfg))
    published = [n for n in storage.listdir(layout.soup_root(cfg)) if n.startswith(report1["run_id"][:8])]
    assert published == [report1["run_id"]]
    assert not storage.exists(lease.lease_uri(cfg.output_uri))
