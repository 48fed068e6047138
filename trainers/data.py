"""Training data on a worker: shard rows -> model samples, one stream per task, packed under a token
budget, with a deterministic task schedule and background refills whose wait time is measured.

Every rank follows the same task schedule (a function of the step only): under ZeRO-3 all ranks must
run the same modules in the same order, since parameters are gathered in forward hooks.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from atoken.packing import first_fit_decreasing
from atoken.patchify import voxel_features_from_views
from preprocess.schema import decode_3d, decode_pixels


def task_schedule(ratios: dict[str, float]) -> list[str]:
    """A smooth weighted round-robin cycle where the rarest task gets one slot (paper Table 2 reads as
    stage 2 = 2:1:6 and stages 3-4 = 2:1:4:1:1, plus image understanding in every stage). Tasks are
    interleaved, not run in blocks."""
    active = {t: r for t, r in ratios.items() if r > 0}
    low = min(active.values())
    counts = {t: max(1, round(r / low)) for t, r in active.items()}
    cycle: list[str] = []
    credit = {t: 0.0 for t in counts}
    n = sum(counts.values())
    for _ in range(n):  # smooth weighted round robin
        for t in credit:
            credit[t] += counts[t]
        best = max(credit, key=lambda t: (credit[t], -list(credit).index(t)))
        credit[best] -= n
        cycle.append(best)
    return cycle


@dataclass
class Sample:
    modality: str
    data: object  # tensor [H,W,3] / [T,H,W,3] in [-1,1], or (voxel feats [N,768] in [0,1], coords [N,3])
    tokens: int
    caption: str
    label: str | None
    sample_id: str
    views: dict | None = None  # 3D: rgb [V,H,W,3] in [0,1], viewmats, Ks (for the render loss)
    stream: str = ""  # the stream (task, or task@dataset) it was read from


def _crop_to_tokens(x: np.ndarray, max_tokens: int, patch: int = 16, rng: np.random.Generator | None = None) -> np.ndarray:
    """Crops [T, H, W, C] (T multiple of 4 kept) so that (T/4)*(H/16)*(W/16) <= max_tokens: centred, or
    with `rng` one patch row / column smaller at a random pixel offset (the patch grid then falls on
    new places of the picture: augmentation that keeps the picture's scale)."""
    T, H, W = x.shape[0], x.shape[1] - x.shape[1] % patch, x.shape[2] - x.shape[2] % patch
    if rng is not None:
        H -= patch * int(H > patch and rng.random() < 0.5)
        W -= patch * int(W > patch and rng.random() < 0.5)
    nt = max(1, T // 4)
    while nt * (H // patch) * (W // patch) > max_tokens and nt > 1:
        nt -= 1
    while nt * (H // patch) * (W // patch) > max_tokens and max(H, W) > patch:
        if H >= W:
            H -= patch
        else:
            W -= patch
    if rng is None:
        top, left = (x.shape[1] - H) // 2, (x.shape[2] - W) // 2
    else:
        top, left = int(rng.integers(0, x.shape[1] - H + 1)), int(rng.integers(0, x.shape[2] - W + 1))
    frames = x[: nt * 4] if T >= 4 else x
    return frames[:, top:top + H, left:left + W]


def _augment(x: np.ndarray, modality: str, rng: np.random.Generator) -> np.ndarray:
    """Images: one of the 8 flips / quarter turns (patch statistics of photos do not depend on them).
    Videos: horizontal and vertical flips and time reversal. [T, H, W, C] in, contiguous out."""
    if modality == "image":
        x = np.rot90(x, int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            x = x[:, :, ::-1]
    else:
        if rng.random() < 0.5:
            x = x[:, :, ::-1]
        if rng.random() < 0.5:
            x = x[:, ::-1]
        if rng.random() < 0.5:
            x = x[::-1]
    return np.ascontiguousarray(x)


def row_to_sample(row: dict, max_tokens: int, patch: int = 16, rng: np.random.Generator | None = None) -> Sample:
    """A shard row as a model sample; with `rng`, images and videos are augmented (training)."""
    px = decode_pixels(row)
    if rng is not None and row["modality"] in ("image", "video"):
        px = _augment(px, row["modality"], rng)
    if row["modality"] == "image":
        x = _crop_to_tokens(px, max_tokens, patch, rng)[0]
        t = torch.from_numpy(x.astype(np.float32) / 127.5 - 1)
        return Sample("image", t, (t.shape[0] // patch) * (t.shape[1] // patch), row["caption"] or "", row["label"],
                      row["sample_id"])
    if row["modality"] == "video":
        x = _crop_to_tokens(px, max_tokens, patch, rng)
        t = torch.from_numpy(x.astype(np.float32) / 127.5 - 1)
        return Sample("video", t, (t.shape[0] // 4) * (t.shape[1] // patch) * (t.shape[2] // patch), row["caption"] or "",
                      row["label"], row["sample_id"])
    extra = decode_3d(row)
    rgb = torch.from_numpy(px[..., :3].astype(np.float32) / 255.0)  # rendered over black (premultiplied)
    vox = torch.from_numpy(extra["voxels"].astype(np.int64))
    if len(vox) > max_tokens:  # deterministic subsample
        keep = torch.from_numpy(np.sort(np.random.default_rng(0).choice(len(vox), max_tokens, replace=False)))
        vox = vox[keep]
    vm, K = torch.from_numpy(extra["viewmats"]), torch.from_numpy(extra["intrinsics"])
    feats = voxel_features_from_views(rgb, vm, K, vox, int(row["grid"]), patch)
    return Sample("3d", (feats, vox), len(vox), row["caption"] or "", row["label"], row["sample_id"],
                  views={"rgb": rgb, "viewmats": vm, "Ks": K, "grid": int(row["grid"])})


def shuffled_rows(shard, buffer: int, seed: int) -> Iterator[dict]:
    """A Ray Train dataset shard's rows through Ray Data's seeded local shuffle buffer (`buffer` rows;
    0: shard order). Shards keep the manifest's order, and a manifest sorted by class gave understanding
    batches of 2-3 digit classes each: the sigmoid loss had almost no negatives of other classes and
    did not fall in the pipeline (it did in one process on shuffled digits)."""
    if buffer <= 0:
        yield from shard.iter_rows()
        return
    for table in shard.iter_batches(batch_size=min(64, buffer), batch_format="pyarrow",
                                    local_shuffle_buffer_size=buffer, local_shuffle_seed=seed):
        yield from table.to_pylist()


class TaskStream:
    """Endless samples of one task from an iterable of shard rows (re-iterated each epoch; the factory
    gets the epoch number, e.g. for its shuffle seed), skipping the rows a resumed run already consumed."""

    def __init__(self, rows_factory: Callable[[int], Iterator[dict]], max_tokens: int, skip: int = 0,
                 rng: np.random.Generator | None = None, key: str = ""):
        self.factory, self.max_tokens, self.rng, self.key = rows_factory, max_tokens, rng, key
        self.consumed, self.epoch = 0, -1
        self._it: Iterator[dict] | None = None
        for _ in range(skip):
            self._next_row()

    def _next_row(self) -> dict:
        for _ in range(2):
            if self._it is None:
                self.epoch += 1
                self._it = iter(self.factory(self.epoch))
            try:
                row = next(self._it)
                self.consumed += 1
                return row
            except StopIteration:
                self._it = None
        raise RuntimeError("task stream is empty (no shard rows for this task on this worker)")

    def next(self) -> Sample:
        s = row_to_sample(self._next_row(), self.max_tokens, rng=self.rng)
        s.stream = self.key
        return s


class MixedStream:
    """Samples of one task drawn from several streams (one per dataset) with fixed shares. The draw order
    comes from an RNG seeded the same on every rank, so every rank takes the same number of rows from
    each stream: the lockstep that Ray Data's streaming split and ZeRO-3 need holds per stream."""

    def __init__(self, streams: dict[str, TaskStream], shares: dict[str, float], seed: list[int], state: dict | None = None):
        self.streams = streams
        self.keys = sorted(shares)
        p = np.array([shares[k] for k in self.keys], dtype=np.float64)
        self.p = p / p.sum()
        self.rng = np.random.default_rng(seed)
        if state:
            self.rng.bit_generator.state = state

    @property
    def consumed(self) -> int:
        return sum(s.consumed for s in self.streams.values())

    def next(self) -> Sample:
        return self.streams[self.keys[int(self.rng.choice(len(self.keys), p=self.p))]].next()


class TaskPool:
    """A fixed-size look-ahead pool of one task's samples, refilled in a background thread.

    Ranks consume rows in lockstep: each step every rank proposes how many samples its best budget-
    filling bin holds and how many extra samples its pool wants to cover the budget, the ranks agree on
    the minimum and the maximum (one all-reduce on the main thread), and each takes exactly that many
    and refills taken + extra. Refills are then identical on every rank, so all ranks reach a Ray Data
    epoch end (a barrier across `streaming_split` iterators) at the same step and never deadlock against
    ZeRO-3's collectives.
    """

    def __init__(self, stream: TaskStream, size: int, max_wait: int = 4):
        self.stream, self.size, self.max_wait = stream, size, max_wait
        self.samples: list[Sample] = []
        self._arrived: list[int] = []  # the take() count when each pooled sample arrived
        self._takes = 0
        self._refill: threading.Thread | None = None
        self._error: BaseException | None = None
        self._start(size)

    def _start(self, n: int) -> None:
        def work():
            try:
                for _ in range(n):
                    self.samples.append(self.stream.next())
                    self._arrived.append(self._takes)
            except BaseException as e:
                self._error = e
        self._refill = threading.Thread(target=work, daemon=True)
        self._refill.start()

    def wait(self) -> float:
        """Blocks until the pool is full; returns the seconds waited (data wait)."""
        t = time.perf_counter()
        if self._refill is not None:
            self._refill.join()
            self._refill = None
        if self._error is not None:
            raise self._error
        return time.perf_counter() - t

    def overdue(self) -> int:
        """How many of the pooled samples (the oldest, a prefix: the pool keeps arrival order) have been
        passed over `max_wait` times."""
        return bisect.bisect_right(self._arrived, self._takes - self.max_wait)

    def best_bin(self, budget: int) -> list[int]:
        """The overdue samples, oldest first while they fit (the oldest always), then the fullest bin in the
        room they leave, largest first, so take(k) keeps the overdue and then the biggest. The fullest bin
        alone let small samples pile up behind large ones that filled budgets exactly: 4-token digits beside
        35-64-token photos at 1,024 tokens waited 18 steps on average and the pool held ~400 of them with one
        overdue sample taken a step (6 steps and ~120 taking them all, in a simulation of two ranks). A lone
        oversized sample only when nothing else fits."""
        sizes = [s.tokens for s in self.samples]
        if not sizes:
            return []
        first, room = [], budget
        for i in range(self.overdue()):
            if first and sizes[i] > room:
                break
            first.append(i)
            room -= sizes[i]
        rest = _fullest_bin(sizes, range(len(first), len(sizes)), room) if room > 0 else []
        return first + rest or [min(range(len(sizes)), key=sizes.__getitem__)]

    def want(self, target_tokens: int, cap: int = 256) -> int:
        """How many more samples this pool wants so that it holds `target_tokens` (enough to fill a
        budget whatever mix of sizes it holds: a pool of 8 with small digits beside photos filled
        ~100 of a 512-token budget). The ranks agree on the maximum, so refills stay equal."""
        tokens = sum(s.tokens for s in self.samples)
        if tokens >= target_tokens or not self.samples:
            return 0
        mean = max(1.0, tokens / len(self.samples))
        return min(cap, int(-(-(target_tokens - tokens) // mean)))

    def take(self, k: int, budget: int, extra: int = 0, best: list[int] | None = None) -> list[Sample]:
        """The first k of the best bin (the overdue, then the largest), topped up towards the budget with
        larger pooled samples; refill k + extra in the background. The top-up first keeps every overdue
        sample, then, if room is left, only the oldest: when the agreed k is below this rank's count, the k
        samples it keeps may be mostly small overdue ones, and pinning them all left the lighter rank at 95%
        of the budget (two ranks of digits beside photos at 256 tokens; 99.4% with the second pass). Those
        swapped out stay overdue, first in the next step's bin. `best`: this step's `best_bin(budget)`,
        when the caller already packed it for the ranks' agreement."""
        best, overdue = self.best_bin(budget) if best is None else best, self.overdue()
        sizes = [s.tokens for s in self.samples]
        lead = next((p for p, i in enumerate(best[:k]) if i >= overdue), len(best[:k]))  # overdue prefix
        chosen = _top_up(sizes, best[:k], budget, pinned=lead)
        chosen = sorted(_top_up(sizes, chosen, budget, pinned=min(lead, 1)))
        batch = [self.samples[i] for i in chosen]
        keep = set(chosen)
        self.samples = [s for i, s in enumerate(self.samples) if i not in keep]
        self._arrived = [a for i, a in enumerate(self._arrived) if i not in keep]
        self._takes += 1
        self._start(len(batch) + extra)
        return batch


def _top_up(sizes: list[int], chosen: list[int], capacity: int, pinned: int = 0) -> list[int]:
    """`chosen` with its smallest members swapped for larger unchosen ones while the total stays within
    `capacity` (the first `pinned` stay). The ranks agree on how many samples each takes, the minimum of
    their fullest bins' counts, and a rank whose fullest bin held more, smaller samples then took fewer
    tokens: the others waited for the fullest rank at every ZeRO-3 collective (two ranks of augmented
    photos at 1,024 tokens: 93% of the budget filled, the lighter rank at 94% of the heavier; topped up:
    99% and 99%, in a simulation of the pools)."""
    slack = capacity - sum(sizes[i] for i in chosen)
    if slack <= 0:
        return chosen
    taken = set(chosen)
    rest = sorted((sizes[j], j) for j in range(len(sizes)) if j not in taken)  # ascending size
    out = list(chosen)
    for pos in sorted(range(pinned, len(out)), key=lambda p: sizes[out[p]]):
        i = out[pos]
        at = bisect.bisect_right(rest, (sizes[i] + slack, len(sizes))) - 1  # the largest that still fits
        if at < 0 or rest[at][0] <= sizes[i]:
            continue
        size, j = rest.pop(at)
        bisect.insort(rest, (sizes[i], i))
        out[pos], slack = j, slack - (size - sizes[i])
        if slack == 0:
            break
    return out


def _fullest_bin(sizes: list[int], candidates, capacity: int) -> list[int]:
    """Indices (largest first) of the fullest first-fit-decreasing bin of `candidates` within `capacity`."""
    idx = list(candidates)
    bins = [[idx[j] for j in b] for b in first_fit_decreasing([sizes[i] for i in idx], max(capacity, 1))]
    fitting = [b for b in bins if sum(sizes[i] for i in b) <= capacity]
    if not fitting:
        return []
    return sorted(max(fitting, key=lambda b: sum(sizes[i] for i in b)), key=lambda i: -sizes[i])


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_ratio x peak (paper: 2000 warmup, 3e-4 -> 3e-5)."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    return f


class TaskData:
    """The worker's data component: one stream and pool per task, lockstep batch agreement across ranks,
    understanding batches sized to hold their negatives, and the position a checkpoint records."""

    def __init__(self, cfg, shards: dict, state: dict | None, rank: int, plan: dict[str, dict[str, float]] | None = None):
        """`shards`: stream key -> Ray Train dataset shard; `plan`: task -> {stream key: share} (default:
        one stream per task, keyed by the task)."""
        import zlib

        self.cfg = cfg
        state = state or {}
        budget = cfg.data.token_budget
        plan = plan or {t: {t: 1.0} for t in cfg.tasks}
        self.streams: dict[str, TaskStream] = {}
        self.tasks, self.pools = {}, {}
        for t in cfg.tasks:
            # an understanding sample takes at most budget / min_und_samples tokens, so every batch holds
            # at least that many samples: the sigmoid loss's negatives
            cap = cfg.data.max_tokens_per_sample
            if t.endswith("_und"):
                cap = min(cap, budget // cfg.data.min_und_samples)
            # understanding samples are not augmented: a turned 6 is a 9, a mirrored digit no digit, and a
            # crop one patch smaller is half a 32-px digit (measured from a stage-1 model, 200 digit batches:
            # with them the sigmoid loss stayed at 21-23 and zero-shot at 0.30; without, 27 -> 0.8 and 0.82)
            augment = cfg.data.augment and not t.endswith("_und")
            for key in plan[t]:
                rng = np.random.default_rng([cfg.data.seed, rank, zlib.crc32(key.encode())]) if augment else None
                if rng is not None and f"rng/{key}" in state:
                    rng.bit_generator.state = state[f"rng/{key}"]
                self.streams[key] = TaskStream(
                    lambda epoch, k=key: shuffled_rows(shards[k], cfg.data.shuffle_buffer,
                                                       zlib.crc32(f"{cfg.data.seed}/{rank}/{k}/{epoch}".encode())),
                    cap, state.get(key, 0), rng, key)
            if list(plan[t]) == [t]:
                self.tasks[t] = self.streams[t]
            else:  # the same draw order on every rank: seeded by the task, not the rank
                self.tasks[t] = MixedStream({k: self.streams[k] for k in plan[t]}, plan[t],
                                            [cfg.data.seed, zlib.crc32(t.encode())], state.get(f"mix/{t}"))
            self.pools[t] = TaskPool(self.tasks[t], max(cfg.data.pool_size, cfg.data.min_und_samples))

    def next(self, task: str) -> tuple[list[Sample], float]:
        """The step's samples and the seconds waited for them."""
        import torch.distributed as dist

        pool = self.pools[task]
        waited = pool.wait()
        budget = self.cfg.data.token_budget
        # [samples to take, -extra samples to pool]: MIN agrees on the fewest to take and the most to add
        best = pool.best_bin(budget)
        agree = torch.tensor([len(best), -pool.want(2 * budget)])
        if dist.is_initialized():
            dist.all_reduce(agree, op=dist.ReduceOp.MIN)  # lockstep row consumption across ranks
        return pool.take(int(agree[0]), budget, extra=-int(agree[1]), best=best), waited

    def settle(self) -> float:
        """Waits for every background refill, so positions are exact; returns the seconds waited."""
        return sum(p.wait() for p in self.pools.values())

    def position(self) -> dict:
        """Rows consumed per stream minus those still pooled (a resumed run re-reads the pool), each
        stream's augmentation RNG and each mixture's draw RNG."""
        pooled: dict[str, int] = {}
        for p in self.pools.values():
            for smp in p.samples:
                pooled[smp.stream] = pooled.get(smp.stream, 0) + 1
        out: dict = {k: s.consumed - pooled.get(k, 0) for k, s in self.streams.items()}
        for k, s in self.streams.items():
            if s.rng is not None:
                out[f"rng/{k}"] = s.rng.bit_generator.state
        for t, m in self.tasks.items():
            if isinstance(m, MixedStream):
                out[f"mix/{t}"] = m.rng.bit_generator.state
        return out
