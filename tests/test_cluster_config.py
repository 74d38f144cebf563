"""ray_cluster.yaml is checked with Ray's own cluster-config validation."""
import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config


def _load():
    with open("ray_cluster.yaml") as f:
        return yaml.safe_load(f)


def test_cluster_yaml_is_valid_for_ray():
    cfg = prepare_config(_load())
    validate_config(cfg)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must take no work"
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.") and "-gpu" in cfg["docker"]["image"]
    assert any("pip install" in c for c in cfg["setup_commands"])
    assert "IamInstanceProfile" in head["node_config"] and "IamInstanceProfile" in gpu["node_config"]


def test_validation_catches_a_broken_config():
    bad = copy.deepcopy(_load())
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_a_head_that_does_not_answer_is_refused_at_once_naming_the_address(tmp_path):
    import os
    import subprocess
    import sys

    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--set", f"output_uri={tmp_path / 'out'}",
                           "--set", f"ray.address=127.0.0.1:{port}"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"frankensoup: error: ray.address 127.0.0.1:{port}: no Ray head answers there (Connection refused); "
        "start one with `ray start --head`, or leave ray.address unset for a local Ray"]
    assert not (tmp_path / "out").exists()


def test_which_addresses_are_dialled(monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.raycluster import check_reachable, gcs_endpoint

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert gcs_endpoint(None) is None and gcs_endpoint("local") is None and gcs_endpoint("auto") is None
    assert gcs_endpoint("ray://head:10001") is None  # Ray Client: Ray reports it itself
    assert gcs_endpoint("10.0.0.5:6379") == ("ray.address", "10.0.0.5", 6379)
    assert gcs_endpoint("[::1]:6379") == ("ray.address", "::1", 6379)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    assert gcs_endpoint(None)[0] == "RAY_ADDRESS"
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS 127\.0\.0\.1:\d+: no Ray head answers there"):
        check_reachable(None)
    with pytest.raises(ConfigError, match="expected host:port"):
        gcs_endpoint("head-without-port")
