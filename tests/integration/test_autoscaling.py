"""Autoscaling, proved locally with Ray's own fake multi-node provider: worker types mirror
infra/ray/cluster-aws.yaml (scaled down to 1 CPU / 1 GPU each, same custom resources); the pipeline's own
requests make the autoscaler add the right node type, the work finishes there, and idle nodes go away."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster_requests import cloud_demands
from tests.services import start_ray_head

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r'''
import json, sys, time
import ray

demands = json.loads(sys.argv[1])
ray.init(address=sys.argv[2], configure_logging=False, log_to_driver=False)
alive = lambda: {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
out = {"nodes_before": len(alive())}

@ray.remote
def decode_task():
    return ray.get_runtime_context().get_node_id()

@ray.remote
class TrainWorker:
    def node(self):
        return ray.get_runtime_context().get_node_id()

t0 = time.time()
dec = demands["decode"]
task = decode_task.options(num_cpus=dec.pop("CPU"), resources=dec).remote()
tw = dict(demands["train_worker"])
worker = TrainWorker.options(num_cpus=tw.pop("CPU"), num_gpus=tw.pop("GPU"), resources=tw).remote()
decode_node, train_node = ray.get([task, worker.node.remote()], timeout=120)
nodes = alive()
out.update(up_s=round(time.time() - t0, 1), nodes_busy=len(nodes),
           decode_node=nodes[decode_node], train_node=nodes[train_node])
ray.kill(worker)
t1 = time.time()
while len(alive()) > out["nodes_before"] and time.time() - t1 < 150:
    time.sleep(1)
out.update(down_s=round(time.time() - t1, 1), nodes_after=len(alive()))
print("RESULT " + json.dumps(out), flush=True)
'''


def fake_cluster_config(launcher: dict, gcs_address: str) -> dict:
    """The cloud launcher config, scaled down for one machine: same worker type names and custom
    resources, CPU and GPU capped at 1, at most one node per type, a 6 s idle timeout."""
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, t in launcher["available_node_types"].items():
        if name == launcher["head_node_type"]:
            continue
        res = {k: (min(v, 1) if k in ("CPU", "GPU") else v) for k, v in t["resources"].items()}
        types[name] = {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": 1}
    empty = {k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                              "setup_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands")}
    return {"cluster_name": "atoken-fake", "max_workers": len(types) - 1, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.1, "head_node_type": "ray.head.default", "available_node_types": types,
            "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False, **empty}


def test_pipeline_requests_scale_the_mirrored_node_types_up_and_down(tmp_path):
    from tests.services import free_port

    launcher = yaml.safe_load((ROOT / "infra" / "ray" / "cluster-aws.yaml").read_text())
    # Scale the pipeline's real requests like the nodes: CPU and GPU capped at 1, custom ones kept.
    demands = {k: {r: (min(v, 1) if r in ("CPU", "GPU") else v) for r, v in d.items()}
               for k, d in cloud_demands().items() if k in ("decode", "train_worker")}
    assert "ingest_node" in demands["decode"] and "train_node" in demands["train_worker"]

    # The GCS port must be known before the config is written: reserve one, then start the head on it.
    port = free_port()
    cfg = tmp_path / "fake-cluster.yaml"
    cfg.write_text(yaml.safe_dump(fake_cluster_config(launcher, f"127.0.0.1:{port}")))
    head = start_ray_head(tmp_path, num_cpus=0, autoscaling_config=cfg, port=port)
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(demands), head.address],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        assert line, f"driver failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        out = json.loads(line[len("RESULT "):])
    finally:
        head.stop()
    assert head.processes() == []
    # Nodes were added: the head alone could not run either request (CPU: 0).
    assert out["nodes_before"] == 1 and out["nodes_busy"] == 3, out
    # Each request ran on the node type that advertises its custom resource, and only there.
    assert out["decode_node"].get("ingest_node") == 1 and out["decode_node"].get("GPU", 0) == 0, out
    assert out["train_node"].get("train_node") == 1 and out["train_node"].get("GPU") == 1, out
    # Idle nodes were removed.
    assert out["nodes_after"] == 1, out
    print(f"autoscaling: nodes up in {out['up_s']} s, idle nodes removed in {out['down_s']} s")
