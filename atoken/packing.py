"""Packing samples into fixed token budgets (bin packing), so batches are packed, not padded.

First-fit decreasing over a window of upcoming samples: the training stream keeps a small look-ahead
buffer and emits a batch when the best bin is full enough. Real-token fraction = tokens / budget.
"""
from __future__ import annotations


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total <= budget. A sample longer than the budget
    gets a bin of its own (the caller decides whether to crop or skip it)."""
    if budget < 1:
        raise ValueError(f"token budget {budget} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def fill_fraction(bins: list[list[int]], lengths: list[int], budget: int) -> float:
    """Real tokens / (bins x budget): 1 - the padding a fixed-shape batch would need."""
    if not bins:
        return 0.0
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * budget)


class StreamPacker:
    """Online packing: buffer up to `lookahead` samples; emit the fullest bin once it reaches
    `min_fill` of the budget (or whatever is left at the end)."""

    def __init__(self, budget: int, lookahead: int = 64, min_fill: float = 0.98):
        self.budget, self.lookahead, self.min_fill = budget, lookahead, min_fill
        self.buffer: list = []  # (length, item)

    def add(self, length: int, item) -> list[list]:
        self.buffer.append((length, item))
        out = []
        while len(self.buffer) >= self.lookahead:
            batch = self._emit(force=True)
            if not batch:
                break
            out.append(batch)
        return out

    def _emit(self, force: bool) -> list:
        lengths = [n for n, _ in self.buffer]
        bins = first_fit_decreasing(lengths, self.budget)
        best = max(bins, key=lambda b: sum(lengths[i] for i in b))
        if not force and sum(lengths[i] for i in best) < self.min_fill * self.budget:
            return []
        chosen = set(best)
        batch = [self.buffer[i][1] for i in sorted(best)]
        self.buffer = [x for i, x in enumerate(self.buffer) if i not in chosen]
        return batch

    def flush(self) -> list[list]:
        out = []
        while self.buffer:
            out.append(self._emit(force=True))
        return out
