"""A pause for Ray Data's scheduling loop while it has nothing in flight.

The streaming executor's loop blocks in `ray.wait` only while a task is running. A training stream
spends most of its life with every read done and its blocks queued behind backpressure, waiting for the
trainers to take them; there the loop runs again at once, round after round of resource accounting and
metrics. Measured on a 2-core node, the split coordinator that runs it took 15 of the 77.5 core-seconds
of a training window, a third of what the two ranks used, and the ranks, in lockstep at every ZeRO-3
collective, both waited whenever it held a core. On a GPU node it is a fraction of one core of many.

The callback sees only the time between the loop's steps: a step that returned within `FAST_STEP_S`
did not block, so the loop sleeps, twice as long after each such step up to `MAX_PAUSE_S`, and not at
all after a step that blocked (tasks were running). A pause delays the next dispatch by at most
`MAX_PAUSE_S`, far below a training step, and the stream's queued blocks cover it.
"""
from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

FAST_STEP_S = 0.02
FIRST_PAUSE_S = 0.001
MAX_PAUSE_S = 0.05


class IdleLoopBackoff(ExecutionCallback):
    def __init__(self, clock=time.perf_counter, sleep=time.sleep) -> None:  # Ray Data passes no arguments
        self._clock, self._sleep = clock, sleep
        self._last = None
        self._pause = 0.0

    def on_execution_step(self, executor) -> None:
        now = self._clock()
        fast = self._last is not None and now - self._last < FAST_STEP_S
        self._pause = min(max(2 * self._pause, FIRST_PAUSE_S), MAX_PAUSE_S) if fast else 0.0
        if self._pause:
            self._sleep(self._pause)
        self._last = self._clock()
