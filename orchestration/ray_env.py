"""Connecting to Ray: a cluster when one is configured (RAY_ADDRESS or an address), else a local one."""
from __future__ import annotations

import os
from pathlib import Path

# A local cluster keeps idle workers for 5 minutes instead of 1 second: a training stage's shard reads are
# small zero-CPU tasks spread over the stage, and with the default each one started a fresh worker
# process (~1.5 s of CPU importing Ray and pyarrow) on the cores the training workers need (measured:
# two such processes at ~40% of a core each during stage 1). On a cluster, set the same in the head's
# system config (infra/ray/cluster-aws.yaml, infra/k8s/raycluster.yaml).
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 300_000, "num_workers_soft_limit": 16}


def ensure_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
               log_dir: Path | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, configure_logging=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                 _system_config=LOCAL_SYSTEM_CONFIG)
