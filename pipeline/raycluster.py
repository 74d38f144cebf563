"""Connecting to Ray: join the cluster we were submitted to, or start a local one."""
from __future__ import annotations

import os

from .config import Config


def init_ray(cfg: Config):
    """`ray job submit` sets RAY_ADDRESS, and a bare ray.init() joins it (or a head started on
    this machine); with neither, Ray starts a local instance. `ray.address` in the config wins."""
    import ray

    if ray.is_initialized():
        return ray
    kwargs = {"log_to_driver": True}
    address = cfg.ray.address
    if address is not None:
        kwargs["address"] = address
    if cfg.ray.num_cpus is not None and (address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))):
        kwargs["num_cpus"] = cfg.ray.num_cpus
    ray.init(**kwargs)
    return ray
