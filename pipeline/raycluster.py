"""Connecting to Ray: join the cluster we were submitted to, or start a local one."""
from __future__ import annotations

import os

from .config import Config, ConfigError


class SharedStorageError(ConfigError):
    """A local output_uri on a cluster whose other nodes cannot see it."""


class ClusterUnreachable(ConfigError):
    """The Ray head that ray.address (or RAY_ADDRESS) names does not answer."""


REACH_TIMEOUT_S = 10.0


def gcs_endpoint(address: str | None) -> tuple[str, str, int] | None:
    """(where it was named, host, port) of the head that ``ray.init`` would dial for this address
    (``ray.address``, else RAY_ADDRESS) when it is a plain host:port; None for "local", "auto",
    a ray:// client address, or nothing."""
    where, value = ("ray.address", address) if address is not None else ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    if not value or "://" in value or value in ("local", "auto"):
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")  # an IPv6 host is written [::1]:6379
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"{where} {value!r}: expected host:port of a Ray head (or 'local', 'auto')")
    return where, host, int(port)


def check_reachable(address: str | None, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Refuse, in one line, a head that nothing answers for: ``ray.init`` would wait for it
    without end."""
    import socket

    endpoint = gcs_endpoint(address)
    if endpoint is None:
        return
    where, host, port = endpoint
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnreachable(f"{where} {host}:{port}: no Ray head answers there ({e.strerror or e}); start "
                                 "one with `ray start --head`, or leave ray.address unset for a local Ray") from None


def connect(address: str | None = None, num_cpus: int | None = None):
    """`ray job submit` sets RAY_ADDRESS, and a bare ray.init() joins it (or a head started on
    this machine); with neither, Ray starts a local instance (of ``num_cpus`` CPUs, if given).
    Ray's logging follows the command line's verbosity (pipeline/console.py)."""
    import ray

    from . import console

    if ray.is_initialized():
        return ray
    check_reachable(address)
    kwargs = console.ray_init_kwargs()
    if address is not None:
        kwargs["address"] = address
    if num_cpus is not None and (address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))):
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    console.ray_data_settings()
    console.preempt_restart_notice()
    return ray


PLACEMENT_FIELDS = ("node_id", "device", "cpus", "gpus", "gpu_ids")  # what placement() records


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
        shared = " or ".join(f"{s}://" for s, remote in storage.SCHEMES.items() if remote)
        return (f"output_uri {cfg.output_uri!r} is a local path, which the cluster's other nodes ({where}) "
                f"cannot see: use an {shared} URI, or set storage.shared=true if every node mounts it at the "
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
