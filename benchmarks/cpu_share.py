"""Where a benchmark window's core-seconds went: each process group's CPU time from Linux `/proc`, beside
the cores' idle time and the time the host's hypervisor took (steal).

On the shared 2-core development host `benchmarks/train.py`'s ratio moves by a third between runs. The
split says whether a slow run lost its time to this node's own processes (Ray's, the stream's) or to the
host, and how much the lockstep ranks left idle. A process that ends inside the window drops out of it
(its time goes uncounted: the idle and steal figures come from the cores, not the processes). Off Linux
it reports nothing.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

# the first prefix a process's command line starts with names its group; a read task's worker process
# is named for its task while it runs one and "IDLE" between tasks, so both count as reads
GROUPS = (("ray::RayTrainWorker", "training ranks"),
          ("ray::ReadArrowShard", "shard reads and idle Ray workers"),
          ("ray::IDLE", "shard reads and idle Ray workers"),
          ("ray::SplitCoordinator", "split coordinators"),
          ("ray::", "Ray Train and Ray Data actors"))


def _group(pid: int, cmd: str) -> str:
    if pid == os.getpid():
        return "benchmark driver"
    for prefix, name in GROUPS:
        if cmd.startswith(prefix):
            return name
    return "Ray's daemons" if "/ray/" in cmd else "other processes"


def _snapshot() -> tuple[float, list[int], dict[int, tuple[int, str]]]:
    """(time, the cores' jiffies by state, pid -> (user + system jiffies, group))."""
    with open("/proc/stat") as f:
        cores = [int(x) for x in f.readline().split()[1:]]
    procs: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read(200).replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended between listing and reading
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        procs[int(name)] = (int(fields[11]) + int(fields[12]), _group(int(name), cmd))
    return time.time(), cores, procs


class CpuSampler:
    """Samples every process every `every` seconds in a background thread while in its `with` block.
    `progress()` counts the reports the measured run has made; the window runs from the first report
    to the last one (the benchmark's steady-state windows)."""

    def __init__(self, progress: Callable[[], int], every: float = 0.5):
        self.progress, self.every = progress, every
        self.samples: list[tuple[int, tuple]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((self.progress(), _snapshot()))
            self._stop.wait(self.every)

    def __enter__(self) -> CpuSampler:
        if os.path.exists("/proc/stat"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def window(self) -> dict:
        """Core-seconds by group over the window and their shares of what the cores offered; {} when the
        run made fewer than two reports while sampled."""
        reports = [n for n, _ in self.samples]
        if not reports or reports[-1] < 2:
            return {}
        first, last = next(i for i, n in enumerate(reports) if n >= 1), reports.index(reports[-1])
        if first == last:
            return {}
        (t0, c0, p0), (t1, c1, p1) = self.samples[first][1], self.samples[last][1]
        tick = os.sysconf("SC_CLK_TCK")
        used: dict[str, float] = {}
        for pid, (jiffies, group) in p1.items():
            before = p0.get(pid, (0, group))[0]
            used[group] = used.get(group, 0.0) + (jiffies - before) / tick
        delta = [b - a for a, b in zip(c0, c1)]
        offered = sum(delta) / tick
        idle = (delta[3] + delta[4]) / tick
        steal = delta[7] / tick if len(delta) > 7 else 0.0
        shares = {k: round(v / offered, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1])}
        shares.update(idle=round(idle / offered, 3), host_steal=round(steal / offered, 3))
        return {"window_s": round(t1 - t0, 1), "core_s_offered": round(offered, 1), "shares": shares}
