"""Connecting to Ray: join the cluster we were submitted to, or start a local one."""
from __future__ import annotations

import os

from .config import Config, ConfigError


class SharedStorageError(ConfigError):
    """A local output_uri on a cluster whose other nodes cannot see it."""


def connect(address: str | None = None, num_cpus: int | None = None):
    """`ray job submit` sets RAY_ADDRESS, and a bare ray.init() joins it (or a head started on
    this machine); with neither, Ray starts a local instance (of ``num_cpus`` CPUs, if given).
    Ray's logging follows the command line's verbosity (pipeline/console.py)."""
    import ray

    from . import console

    if ray.is_initialized():
        return ray
    kwargs = console.ray_init_kwargs()
    if address is not None:
        kwargs["address"] = address
    if num_cpus is not None and (address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))):
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    console.ray_data_settings()
    console.preempt_restart_notice()
    return ray


def placement(device: str) -> dict:
    """Where the calling Ray task or actor runs: its node, the CPUs and GPUs Ray assigned it
    (logical GPUs too: a fraction when it shares one) with the GPU ids, and the torch
    ``device`` it computes on ("cpu" when the node has no CUDA device behind its GPUs)."""
    import ray

    ctx = ray.get_runtime_context()
    assigned = ctx.get_assigned_resources()
    return {"node_id": ctx.get_node_id(), "device": str(device), "cpus": float(assigned.get("CPU", 0.0)),
            "gpus": float(assigned.get("GPU", 0.0)), "gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids())}


def alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def storage_problem(cfg: Config, n_nodes: int) -> str | None:
    """Why output_uri cannot serve this cluster, or None. Workers on other nodes read and write
    under output_uri (checkpoints, shards, ingredients): a path on the driver's own disk is not
    theirs."""
    from . import storage

    if storage.is_remote(cfg.output_uri) or cfg.storage.shared:
        return None
    if n_nodes > 1 or cfg.ray.autoscaling:
        where = f"{n_nodes} nodes" if n_nodes > 1 else "nodes the autoscaler adds"
        return (f"output_uri {cfg.output_uri!r} is a local path, which the cluster's other nodes ({where}) "
                "cannot see: use an s3:// URI, or set storage.shared=true if every node mounts it at the "
                "same path (NFS, EFS, FSx)")
    return None


def init_ray(cfg: Config):
    """Connect as the config says (`ray.address` in the config wins over RAY_ADDRESS), and
    refuse an output_uri the cluster's nodes cannot share before anything is written."""
    ray = connect(cfg.ray.address, cfg.ray.num_cpus)
    problem = storage_problem(cfg, len(alive_nodes(ray)))
    if problem:
        raise SharedStorageError(problem)
    return ray
