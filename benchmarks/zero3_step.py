"""Where a ZeRO-3 training step's time goes on CPU, without Ray: the same module, loss and optimizer as a
stage, stepped (a) plainly in one process with 1 thread (one rank's arithmetic), (b) under DeepSpeed
ZeRO-3 in a world of 1 (its hooks and optimizer, no peer), (c) under ZeRO-3 in a world of 2 gloo
processes with 1 thread each (plus collectives and waiting in lockstep), and (d) plainly with 2 threads
on both ranks' tokens (the baseline `benchmarks/train.py` divides by, here on prebuilt batches).

    python benchmarks/zero3_step.py [--budget <TrainConfig's>] [--steps 40] [--preset tiny]
        [--leaf TransformerBlock] [--zero KEY=VALUE ...]

`benchmarks/train.py` measures the whole (Ray Train, streamed data, conversion in the worker); this
script splits off the part DeepSpeed owns, so a change to ZeRO-3 settings can be judged on the step
alone. The batches are fixed synthetic photos (128x128 and 128x96 px: the sample corpus's 64 and 48
tokens), built before the clock starts; the arithmetic does not depend on the pixels. Every figure
comes from the same run: the machine is shared, and only ratios taken side by side mean anything.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import time

import torch

from trainers.config import TrainConfig

WARMUP = 3


def _config(preset_name: str) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.preset = preset_name
    cfg.losses.feature_network = "none"  # as benchmarks/train.py: the model + optimizer step
    return cfg


def _module(cfg: TrainConfig):
    from atoken.config import preset
    from atoken.model import AToken
    from trainers.module import TrainModule

    torch.manual_seed(0)
    return TrainModule(AToken(preset(cfg.model.preset, latent_channels=cfg.model.latent_channels)), 384, None, cfg)


def _batches(budget: int, seed: int, n: int = 8) -> list[list]:
    from trainers.data import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch, used = [], 0
        while used + 64 <= budget:
            h = 128 if torch.rand(1, generator=g).item() < 0.5 else 96
            batch.append(Sample("image", torch.rand(h, 128, 3, generator=g) * 2 - 1, (h // 16) * 8, "", 0, "x"))
            used += batch[-1].tokens
        out.append(batch)
    return out


def _timed(steps: int, step_fn) -> dict:
    """Seconds per step (wall and this process's CPU) and per phase, after WARMUP steps."""
    phases: dict[str, float] = {}
    for s in range(steps):
        if s == WARMUP:
            phases, t0, c0 = {}, time.perf_counter(), time.process_time()
        for name, dt in step_fn(s).items():
            phases[name] = phases.get(name, 0.0) + dt
    n = steps - WARMUP
    return {"step": (time.perf_counter() - t0) / n, "cpu": (time.process_time() - c0) / n,
            **{k: v / n for k, v in phases.items()}}


def plain(budget: int, steps: int, threads: int) -> dict:
    from trainers.engine import param_groups

    torch.set_num_threads(threads)
    cfg = _config(os.environ["BENCH_PRESET"])
    module = _module(cfg)
    opt = torch.optim.AdamW(param_groups(module, cfg), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    batches = _batches(budget, 0)

    def step(s: int) -> dict:
        t = [time.perf_counter()]
        terms = module("image_rec", batches[s % len(batches)], None, s)
        t.append(time.perf_counter())
        opt.zero_grad()
        terms["total"].backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip)
        opt.step()
        t.append(time.perf_counter())
        return {"forward": t[1] - t[0], "backward": t[2] - t[1], "optimizer": t[3] - t[2]}
    return _timed(steps, step)


def _zero3_rank(rank: int, world: int, port: int, budget: int, steps: int, leaf: list[str], zero: dict, out) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from trainers.engine import deepspeed_config, mark_leaf_modules, param_groups, skip_cpu_shm_op

    skip_cpu_shm_op()
    cfg = _config(os.environ["BENCH_PRESET"])
    cfg.scaling.zero_overrides, cfg.scaling.zero_leaf_modules = zero, leaf
    module = _module(cfg)
    mark_leaf_modules(module, cfg)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, cfg),
                                      config=deepspeed_config(cfg, gpu=False), dist_init_required=False)
    batches = _batches(budget, rank)

    def step(s: int) -> dict:
        t = [time.perf_counter()]
        terms = engine("image_rec", batches[s % len(batches)], None, s)
        t.append(time.perf_counter())
        engine.backward(terms["total"])
        t.append(time.perf_counter())
        engine.step()
        t.append(time.perf_counter())
        return {"forward": t[1] - t[0], "backward": t[2] - t[1], "optimizer": t[3] - t[2]}
    out.put((rank, _timed(steps, step)))
    dist.barrier()  # neither rank tears down gloo while its peer is still in it (one rank aborted so)
    dist.destroy_process_group()


def zero3(world: int, budget: int, steps: int, leaf: list[str], zero: dict) -> dict:
    """Rank 0's figures; its step time is the world's (the ranks step in lockstep)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_zero3_rank, args=(r, world, port, budget, steps, leaf, zero, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    while len(results) < world:  # a rank that dies leaves its peer blocked in a collective: stop both
        try:
            rank, figures = q.get(timeout=2)
            results[rank] = figures
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed:
                for p in procs:
                    p.terminate()
                raise RuntimeError(f"a ZeRO-3 rank exited with code {failed[0]} (its traceback is above)")
    for p in procs:
        p.join()
    return results[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=int, default=TrainConfig().data.token_budget, help="tokens per rank per step")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--leaf", action="append", default=[], metavar="CLASS",
                    help="a module class ZeRO-3 gathers whole (deepspeed.utils.set_z3_leaf_modules)")
    ap.add_argument("--zero", action="append", default=[], metavar="KEY=VALUE",
                    help="scaling.zero_overrides entry (a DeepSpeed zero_optimization key; VALUE as JSON)")
    args = ap.parse_args()
    os.environ["BENCH_PRESET"] = args.preset  # read by the spawned ranks too
    zero = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.zero)}
    one = plain(args.budget, args.steps, threads=1)
    w1 = zero3(1, args.budget, args.steps, args.leaf, zero)
    w2 = zero3(2, args.budget, args.steps, args.leaf, zero)
    two = plain(2 * args.budget, args.steps, threads=2)
    r = {k: {p: round(v, 4) for p, v in d.items()} for k, d in
         (("plain_1_thread", one), ("zero3_world_1", w1), ("zero3_world_2", w2), ("plain_2_threads_both_ranks", two))}
    print(json.dumps({"preset": args.preset, "budget_per_rank": args.budget, "leaf": args.leaf, "zero_overrides": zero,
                      "seconds_per_step": r,
                      "zero3_hooks_and_optimizer_vs_plain": round(w1["step"] / one["step"], 3),
                      "collectives_and_lockstep_vs_world_1": round(w2["step"] / w1["step"], 3),
                      "zero3_world_2_tokens_per_s": round(2 * args.budget / w2["step"], 1),
                      "plain_2_threads_tokens_per_s": round(2 * args.budget / two["step"], 1),
                      "ratio": round(two["step"] / w2["step"], 3)}, indent=1))


if __name__ == "__main__":
    main()
