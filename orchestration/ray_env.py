"""Connecting to Ray: a cluster when one is configured (RAY_ADDRESS or an address), else a local one."""
from __future__ import annotations

import os
from pathlib import Path

# A local cluster keeps an idle worker for 20 s instead of 1 s: a training stage's shard reads are small
# zero-CPU tasks spread over the stage, and with the default each one started a fresh worker process
# (~1.5 s of CPU importing Ray and pyarrow) on the cores the training workers need (measured: two such
# processes at ~40% of a core each during stage 1). Longer is not better: every Ray worker process wakes
# 100 times a second to check for signals (~0.85% of a core each, idle or not), and a stage's reads did
# not reuse the workers the ingest left behind, so kept 5 minutes those only took the ranks' cores
# (docs/benchmarks.md, "Where the cores go").
# A cluster keeps Ray's defaults: a node kills idle workers only while it has more workers than CPUs.
# The stage's streams also start a handful of small worker processes at once (split coordinators, reads):
# more than the default start-up concurrency (the CPU count), which the raylet reports as a warning.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 20_000, "worker_maximum_startup_concurrency": 8}


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
