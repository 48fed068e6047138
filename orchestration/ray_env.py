"""Connecting to Ray: a cluster when one is configured (RAY_ADDRESS or an address), else a local one."""
from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray Data's progress bars are wanted; the driver's log noise is not.
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
