"""DeepSpeed ZeRO-3 for one stage: its config from the stage's training config, the optimiser's parameter
groups, and the worker's thread settings."""
from __future__ import annotations

import os
import sys

import torch

from trainers.config import TrainConfig
from trainers.data import lr_lambda


def set_threads(cfg: TrainConfig) -> int:
    """Torch / OpenMP threads of a training worker. Ray workers do not get torchrun's OMP_NUM_THREADS=1,
    and an unset thread count oversubscribes the node (docs/benchmarks.md)."""
    n = cfg.scaling.threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n


def import_deepspeed():
    """`import deepspeed`, leaving out the MLflow import its autotuner makes whenever MLflow is installed:
    1.3-1.5 s of CPU and ~140 MB in every rank at every stage start (measured), for a rank that never
    autotunes nor talks to MLflow (the workflow's driver does). A process that has MLflow keeps it."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed
        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError, which DeepSpeed's autotuner catches
    try:
        import deepspeed
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]
    return deepspeed


def deepspeed_config(cfg: TrainConfig, gpu: bool) -> dict:
    bf16 = cfg.scaling.precision == "bf16" or (cfg.scaling.precision == "auto" and gpu)
    persist = cfg.scaling.zero_persistence_threshold
    if persist < 0:
        persist = 100_000 if gpu else 0
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False,
                              "stage3_param_persistence_threshold": persist, **cfg.scaling.zero_overrides},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay,
            "eps": 1e-8, "torch_adam": not (gpu and cfg.scaling.fused_adam)}},  # CPU: torch's AdamW, no JIT build
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def param_groups(module: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Encoder at lr x its multiplier (0.1 only when the encoder really is pretrained), the sigmoid loss's
    temperature and bias at lr x optim.logit_lr_mult, the Gaussian decoder at lr x optim.gaussian_lr_mult;
    no weight decay on norms, biases, tables, scalars. Parts that share a learning rate and a weight decay
    share a group (named by its parts, e.g. `enc-wd+rest-wd`): ZeRO-3's optimizer step takes a gradient
    norm and an all-reduce per group, and seven groups where two differ cost 4-6 ms a step on CPU."""
    mult = cfg.optim.encoder_multiplier(cfg.model.pretrained_encoder)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        part = ("logit" if name in ("model.logit_scale", "model.logit_bias") else
                "enc" if name.startswith("model.encoder.") else
                "gs" if name.startswith("model.gs_decoder.") else "rest")
        decay = p.ndim >= 2 and "position_embedding" not in name
        groups.setdefault((part, decay), []).append(p)
    lr = {"enc": cfg.optim.lr * mult, "rest": cfg.optim.lr, "logit": cfg.optim.lr * cfg.optim.logit_lr_mult,
          "gs": cfg.optim.lr * cfg.optim.gaussian_lr_mult}
    merged: dict[tuple[float, float], tuple[list, list[str]]] = {}
    for (part, decay), ps in sorted(groups.items()):
        params, parts = merged.setdefault((lr[part], cfg.optim.weight_decay if decay else 0.0), ([], []))
        params += ps
        parts.append(f"{part}-{'wd' if decay else 'nowd'}")
    return [{"params": ps, "lr": rate, "weight_decay": wd, "name": "+".join(parts)}
            for (rate, wd), (ps, parts) in merged.items()]


def process_group_backend(gpu: bool) -> str:
    """gloo on CPU; on GPUs NCCL for CUDA tensors beside gloo for CPU ones. The per-step lockstep batch
    agreement and the report windows' reductions are small CPU tensors, and a process group made for
    "nccl" alone has no backend for them (PyTorch: "No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if gpu else "gloo"


def skip_cpu_shm_op() -> None:
    """DeepSpeed's communication backend JIT-builds its shared-memory all-reduce op on a CPU accelerator
    whenever it starts. That op serves only `inference_all_reduce`, which training never calls; its build
    took 36.8 s of a fresh main job's stage 1 (and again whenever the extension cache is invalidated), so
    CPU training does without it and ZeRO-3's collectives go through the gloo process group as before."""
    import importlib

    # by module path: the attribute `deepspeed.comm.torch` is the torch package itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def mark_leaf_modules(module: torch.nn.Module, cfg: TrainConfig) -> list[torch.nn.Module]:
    """Marks the modules of `scaling.zero_leaf_modules`' classes: ZeRO-3 then gathers each one whole,
    in one fetch, and puts no hooks on its children."""
    if not cfg.scaling.zero_leaf_modules:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    return set_z3_leaf_modules(module, cfg.scaling.leaf_classes())


def build_engine(module: torch.nn.Module, cfg: TrainConfig, gpu: bool):
    """deepspeed.initialize on the process group Ray Train set up."""
    deepspeed = import_deepspeed()
    if not gpu:
        skip_cpu_shm_op()
    mark_leaf_modules(module, cfg)
    schedule = lr_lambda(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, cfg), config=deepspeed_config(cfg, gpu),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule), dist_init_required=False)
    return engine
