"""Connecting to Ray: a cluster when one is configured (RAY_ADDRESS or an address), else a local one."""
from __future__ import annotations

import os
from pathlib import Path

# A local cluster keeps idle workers for 5 minutes instead of 1 second: a training stage's shard reads are
# small zero-CPU tasks spread over the stage, and with the default each one started a fresh worker
# process (~1.5 s of CPU importing Ray and pyarrow) on the cores the training workers need (measured:
# two such processes at ~40% of a core each during stage 1). On a cluster, set the same in the head's
# system config (infra/ray/cluster-aws.yaml, infra/k8s/raycluster.yaml).
# The stage's streams also start a handful of small worker processes at once (split coordinators, reads):
# more than the default start-up concurrency (the CPU count), which the raylet reports as a warning.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 300_000, "num_workers_soft_limit": 16,
                       "worker_maximum_startup_concurrency": 8}


def ensure_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
               log_dir: Path | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # workers' output (Train workers, the controller, Ray Data) stays in Ray's session logs unless verbose
    if address:
        ray.init(address=address, configure_logging=False, log_to_driver=verbose)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=verbose,
                 _system_config=LOCAL_SYSTEM_CONFIG)
