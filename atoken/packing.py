"""Packing samples into fixed token budgets (bin packing), so batches are packed, not padded.

First-fit decreasing over a look-ahead pool of samples (trainers.data.TaskPool). Real-token fraction =
tokens / budget.
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
