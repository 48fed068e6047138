"""The Ray resources the pipeline requests on a cloud cluster, computed by the code that requests them;
shared by the infra consistency tests and the autoscaling test."""
from __future__ import annotations


def cloud_demands() -> dict[str, dict[str, float]]:
    """What the workflow asks Ray for with `cluster=cloud`: one decode task, one 3D render actor, one
    training worker (and how many training workers a stage has)."""
    from orchestration.hydra_config import load

    cfg = load("run", ["cluster=cloud", "model=base", "curriculum=paper"]).validate()
    icfg = cfg.ingest
    decode = icfg.resources.cpu_task_args(icfg.resources.decode_cpus)
    stage = cfg.stage_train_config(0)
    return {
        "decode": {"CPU": decode["num_cpus"], **decode.get("resources", {})},
        "render_actor": {"GPU": icfg.resources.render_gpus},
        "train_worker": stage.scaling.worker_resources(),
        "_num_train_workers": {"n": stage.scaling.num_workers},
    }


def fits(demand: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in demand.items() if v > 0)
