"""Connecting to Ray: join the cluster we were submitted to, or start a local one."""
from __future__ import annotations

import os

from .config import Config


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
    return ray


def init_ray(cfg: Config):
    """Connect as the config says; `ray.address` in the config wins over RAY_ADDRESS."""
    return connect(cfg.ray.address, cfg.ray.num_cpus)
