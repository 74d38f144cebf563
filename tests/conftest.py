"""Session-scoped fixtures shared by every stage's tests: a real S3-compatible server on
loopback, one local Ray, and one small prepared demo (data + base model) made in seconds."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

# tests never join a cluster they happen to find
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_REGION", "us-east-1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server process on 127.0.0.1; yields its endpoint URL. AWS_ENDPOINT_URL is set
    for this process (and so for Ray workers started after it)."""
    import shutil

    exe = shutil.which("moto_server")
    assert exe, "moto_server not installed: pip install -e '.[dev]'"
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields its s3:// URI."""
    import pyarrow.fs as pafs

    host = s3_server.split("://", 1)[1]
    fs = pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir("frankensoup-test")
    return "s3://frankensoup-test"


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """A fresh root URI, once on local disk and once on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    module = request.module.__name__.rsplit(".", 1)[-1]
    return f"{bucket}/{module}-{request.node.name.replace('[', '-').rstrip(']')}"


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session. It starts after the moto server, so its workers inherit
    AWS_ENDPOINT_URL and can read s3:// outputs (a worker never sees env set after ray.init)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ---- the shared small demo --------------------------------------------------------------

TINY_OVERRIDES = [
    "model.demo_base.steps=60",
    "finetune.num_trials=2",
    "finetune.max_concurrent=2",
    "finetune.space.epochs=[1]",
    "soup.granularity=1",
    "soup.max_func_evals_per_dim=2",
    "soup.num_workers=2",
    "soup.num_evaluators=1",
    "soup.phase2.evals_per_dim=1",
    # the two reference rows cost two more scoring passes per soup: on where a test needs them
    "soup.wise_ft.enabled=false",
    "soup.output_ensemble.enabled=false",
    "soup.methods.model_stock.enabled=false",
    "soup.methods.lines.enabled=false",
    "ray.address=local",
    "ray.num_cpus=2",
]


def tiny_config(output_uri: str, *extra: str):
    """The demo config shrunk to run in seconds (a few hundred pretraining images, 60 steps)."""
    from pipeline.config import load_config

    return load_config(None, [*TINY_OVERRIDES, f"output_uri={output_uri}", *extra])


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory):
    """One prepared output (demo shards + a base CLIP trained in seconds + zero-shot head),
    shared read-only by every stage's tests: copy it (clone_output) before writing to it."""
    from pipeline.prepare import run_prepare

    out = tmp_path_factory.mktemp("prepared") / "out"
    cfg = tiny_config(str(out))
    run_prepare(cfg, log=lambda *_: None)
    return cfg


def clone_output(cfg, dst, *extra: str):
    """Copy a prepared output to ``dst`` and return a config pointing at the copy."""
    import shutil

    shutil.copytree(cfg.output_uri, dst)
    return tiny_config(str(dst), *extra)


def upload(local_dir: str, uri: str) -> None:
    """Copy a local output folder to ``uri`` (s3:// on the moto server)."""
    import pyarrow.fs as pafs

    from pipeline import storage

    loc = storage.resolve(uri)
    pafs.copy_files(local_dir, loc.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=loc.fs)


def perturbed(state: dict, seed: int, scale: float) -> dict:
    """A seeded perturbation of a state dict, ``scale`` times each tensor's spread: parameters
    and running means move additively, running variances multiplicatively (they must stay
    positive); integer buffers stay as they are."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, v in state.items():
        if not v.is_floating_point():
            out[key] = v.clone()
        elif key.endswith("running_var"):
            out[key] = v * torch.exp(scale * torch.randn(v.shape, generator=gen))
        else:
            spread = v.std().item() if v.numel() > 1 and v.std() > 0 else 1.0
            out[key] = v + scale * spread * torch.randn(v.shape, generator=gen)
    return out


# ---- the shared small demo, finetuned and evaluated ---------------------------------------

# evaluated_demo's settings (pass them to clone_output): a base pretrained long enough that its
# finetunes stay close together, so soups of them behave as soups do (the 60-step base's do not)
EVALUATED_OVERRIDES = ("model.demo_base.steps=200", "finetune.num_trials=3", "finetune.seed=1")


@pytest.fixture(scope="session")
def evaluated_demo(tmp_path_factory, ray_local):
    """A finished prepare (200-step base), finetune (3 one-epoch trials) and evaluate stage,
    shared read-only: clone it with ``clone_output(evaluated_demo, dst, *EVALUATED_OVERRIDES)``."""
    from pipeline.evaluate.stage import run_evaluate
    from pipeline.finetune.sweep import run_finetune
    from pipeline.prepare import run_prepare

    cfg = tiny_config(str(tmp_path_factory.mktemp("evaluated") / "out"), *EVALUATED_OVERRIDES)
    quiet = {"log": lambda *_: None}
    run_prepare(cfg, **quiet)
    run_finetune(cfg, **quiet)
    run_evaluate(cfg, **quiet)
    return cfg


@pytest.fixture(scope="session")
def one_node_run(ray_local, tmp_path_factory):
    """tests/multinode_job.py's SETTINGS run on the session's one-node Ray: (its config, its
    report), the result a run of the same config on several nodes (tests/test_multinode.py,
    tests/test_autoscaling.py) must reproduce."""
    from multinode_job import SETTINGS
    from pipeline.run import run_all

    cfg = tiny_config(str(tmp_path_factory.mktemp("one-node") / "out"), *SETTINGS)
    return cfg, run_all(cfg, log=lambda *_: None)


@pytest.fixture(scope="session")
def one_node_reference(one_node_run):
    return one_node_run[1]


PREPARED = ("data", "base", "prepare")  # what the prepare stage writes under output_uri


def copy_prepared(cfg, dst_uri: str) -> None:
    """Copy a run's prepare outputs (demo shards, base CLIP, zero-shot head, its marker) to
    ``dst_uri``: a run there of the same config reuses them (content keys) and starts at finetune.
    Prepare runs in the driver alone, so the cluster tests lose nothing by sharing it."""
    for name in PREPARED:
        upload(os.path.join(cfg.output_uri, name), f"{dst_uri}/{name}")
