"""The metrics component: per-step accounting in report windows, reduced across ranks, sent to sinks.

Owns `run.report_every`. A window accumulates tokens, samples, data wait, loss terms and the step-time
breakdown; at a report step it is reduced over the ranks (tokens/s are totals, times are rank 0's) and
handed to every sink. `ray.train.report` carries it to the driver, where orchestration's callbacks log
it live (MLflow, console); `HistoryFile` keeps `<run>/metrics.jsonl` next to the checkpoints.
"""
from __future__ import annotations

import json
import resource
import time
from collections import Counter
from typing import Protocol

import torch
import torch.distributed as dist

from preprocess import storage
from trainers.config import TrainConfig

PHASES = ("data", "select", "forward", "backward", "optimizer", "ema")


class MetricsSink(Protocol):
    def write(self, metrics: dict) -> None: ...


class HistoryFile:
    """`<run>/metrics.jsonl` (rank 0): one line per report, rewritten whole so a resumed run drops the
    lines after its checkpoint."""

    def __init__(self, uri: str, resume_step: int):
        self.uri = uri
        self.rows = []
        if storage.exists(uri):
            rows = [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]
            self.rows = [r for r in rows if r["step"] <= resume_step]

    def write(self, metrics: dict) -> None:
        self.rows.append(metrics)
        storage.commit_bytes(self.uri, "\n".join(json.dumps(r) for r in self.rows).encode())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepTimer:
    """Wall and CPU seconds of one step's phases (CPU seconds far below wall: other processes hold the
    cores or the ranks wait on each other)."""

    def __init__(self):
        self.t = time.perf_counter()
        self.c = time.process_time()
        self.start = self.t
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.t
        self.t = now

    def split(self, phase: str, part: str, seconds: float) -> None:
        """Moves `seconds` of `phase` into `part` (the data wait inside batch selection)."""
        self.phases[phase] -= seconds
        self.phases[part] = self.phases.get(part, 0.0) + seconds

    def done(self) -> dict[str, float]:
        """The phases, and the whole step up to the last mark (so the phases sum to it exactly)."""
        return {**self.phases, "step": self.t - self.start, "cpu": time.process_time() - self.c}


def token_balance(tokens: torch.Tensor) -> float:
    """Mean over steps of (mean over ranks / max over ranks) of the tokens each rank trained on, from
    [ranks, steps]. Every rank waits for the fullest one at each ZeRO-3 collective: at 0.9 the others
    computed ~10% less than the step's time allowed them (1.0: all equal, or no step)."""
    if tokens.numel() == 0:
        return 1.0
    return float((tokens.mean(0) / tokens.max(0).values.clamp(min=1)).mean())


class MetricsProcessor:
    def __init__(self, cfg: TrainConfig, world: int, device: torch.device, sinks: list[MetricsSink],
                 flops_per_token: float = 0.0, peak_flops: float = 0.0):
        self.cfg, self.world, self.device, self.sinks = cfg, world, device, sinks
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.extra: dict[str, float] = {}  # reported once with the next window (e.g. start-up times)
        self._new()

    def _new(self) -> None:
        self.tokens = self.samples = self.steps = 0
        self.step_tokens: list[int] = []  # this rank's tokens at each step of the window
        self.wait = 0.0
        self.t0 = time.perf_counter()
        self.losses: Counter = Counter()  # sums over the window's steps of each task
        self.task_steps: Counter = Counter()
        self.phases: Counter = Counter()

    def due(self, done: int) -> bool:
        return done % self.cfg.run.report_every == 0 or done == self.cfg.steps

    def record(self, task: str, terms: dict, tokens: int, samples: int, waited: float, times: dict) -> None:
        self.tokens += tokens
        self.step_tokens.append(tokens)
        self.samples += samples
        self.wait += waited
        self.steps += 1
        self.phases.update(times)
        self.task_steps[task] += 1
        for k, v in terms.items():
            self.losses[f"loss/{task}/{k}"] += float(v.detach()) if torch.is_tensor(v) else float(v)

    def add_wait(self, seconds: float) -> None:
        self.wait += seconds

    def _token_balance(self) -> float:
        per_step = torch.tensor(self.step_tokens, dtype=torch.float64).reshape(1, -1)
        if dist.is_initialized() and self.world > 1:
            parts = [torch.empty_like(per_step) for _ in range(self.world)]
            dist.all_gather(parts, per_step)
            per_step = torch.cat(parts)
        return token_balance(per_step)

    def flush(self, step: int, lr: float, extra: dict | None = None) -> dict:
        """Reduces the window over the ranks, writes it to the sinks, starts a new window."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        counts = torch.tensor([self.tokens, self.samples, self.wait, dt], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(counts)
        tokens, samples, wait, total_dt = counts.tolist()
        balance = self._token_balance()
        wall = total_dt / self.world
        m = {"step": step, "steps_total": self.cfg.steps, "lr": lr, "tokens_per_s": tokens / wall,
             "samples_per_s": samples / wall, "data_wait_fraction": wait / max(total_dt, 1e-9),
             "peak_memory_mb": peak_memory_mb(self.device), "token_balance": balance,
             "budget_fill": tokens / max(self.world * self.cfg.data.token_budget * self.steps, 1),
             # each loss term averaged over the window's steps of its task (rank 0)
             **{k: v / self.task_steps[k.split("/")[1]] for k, v in self.losses.items()},
             # where a rank's step time goes, seconds per step (this rank)
             **{f"time/{k}_s": v / max(self.steps, 1) for k, v in self.phases.items()}, **self.extra, **(extra or {})}
        self.extra = {}
        if self.flops_per_token and self.peak_flops:
            m["mfu"] = tokens / wall * self.flops_per_token / (self.peak_flops * self.world)
        for s in self.sinks:
            s.write(m)
        self._new()
        return m
