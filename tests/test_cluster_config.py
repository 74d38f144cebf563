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
