"""Packed sparse 4D token batches: features [L, C], int coords [L, 5] (batch, t, x, y, z), offsets.

Samples are packed back to back, never padded. Rows of one sample are contiguous and in batch order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODALITIES = ("image", "video", "3d")


@dataclass
class SparseBatch:
    feats: torch.Tensor  # [L, C]
    coords: torch.Tensor  # [L, 5] int: (b, t, x, y, z)
    modalities: list[str] = field(default_factory=list)  # one per sample
    # per-sample shapes needed to un-patchify (frames, height, width) or None for 3D
    shapes: list[tuple[int, int, int] | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.feats.ndim != 2 or self.coords.ndim != 2 or self.coords.shape[1] != 5:
            raise ValueError(f"SparseBatch: feats must be [L, C] and coords [L, 5], got "
                             f"{tuple(self.feats.shape)} and {tuple(self.coords.shape)}")
        if self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError("SparseBatch: feats and coords disagree on L")
        b = self.coords[:, 0]
        if len(b) and bool((b[1:] < b[:-1]).any()):
            raise ValueError("SparseBatch: rows of one sample must be contiguous and in batch order")

    @property
    def num_samples(self) -> int:
        return int(self.coords[-1, 0]) + 1 if len(self.coords) else 0

    @property
    def offsets(self) -> torch.Tensor:
        """[B + 1] row offsets of each sample."""
        counts = torch.bincount(self.coords[:, 0].long(), minlength=self.num_samples)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.offsets
        return self.feats[o[i]:o[i + 1]], self.coords[o[i]:o[i + 1]]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "SparseBatch":
        return SparseBatch(self.feats.to(device, dtype) if dtype else self.feats.to(device),
                           self.coords.to(device), list(self.modalities), list(self.shapes))

    def with_feats(self, feats: torch.Tensor) -> "SparseBatch":
        return SparseBatch(feats, self.coords, list(self.modalities), list(self.shapes))


def concat(batches: list[SparseBatch]) -> SparseBatch:
    """Packs several batches into one, renumbering the batch column."""
    feats, coords, mods, shapes, base = [], [], [], [], 0
    for sb in batches:
        c = sb.coords.clone()
        c[:, 0] += base
        base += sb.num_samples
        feats.append(sb.feats)
        coords.append(c)
        mods += sb.modalities
        shapes += sb.shapes
    return SparseBatch(torch.cat(feats), torch.cat(coords), mods, shapes)


@dataclass
class Segments:
    """Attention segments: one per (sample, temporal window). Tokens never attend across segments.

    `order` sorts tokens so that each segment is contiguous; `cu` are its cumulative lengths; `pos` are
    the (t, x, y, z) RoPE positions with t rebased to the window start; `grid` is the per-segment
    (max x + 1, max y + 1) the learned position table is resized to.
    """

    order: torch.Tensor
    inverse: torch.Tensor | None
    cu: list[int]
    pos: torch.Tensor  # [L, 4] in sorted order
    grid: list[tuple[int, int]]
    sample_of_segment: list[int]

    @property
    def count(self) -> int:
        return len(self.cu) - 1


def segments(coords: torch.Tensor, window: int) -> Segments:
    """Groups tokens into windows [t0 + w*k, t0 + w*(k+1)) with t0 the batch's minimum t."""
    c = coords.long()
    t0 = int(c[:, 1].min()) if len(c) else 0
    win = torch.div(c[:, 1] - t0, window, rounding_mode="floor")
    key = c[:, 0] * (int(win.max()) + 1 if len(c) else 1) + win
    if len(key) < 2 or bool((key[1:] >= key[:-1]).all()):
        order, inverse = torch.arange(len(c), device=c.device), None
    else:
        order = torch.argsort(key, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=c.device)
    ks, cs = key[order], c[order]
    _, counts = torch.unique_consecutive(ks, return_counts=True)
    cu = [0] + torch.cumsum(counts, 0).tolist()
    first = torch.tensor(cu[:-1], dtype=torch.long, device=c.device)
    seg = torch.repeat_interleave(torch.arange(len(counts), device=c.device), counts)
    pos = cs[:, 1:].clone()
    pos[:, 0] = cs[:, 1] - (t0 + window * win[order[first]])[seg]
    extent = torch.zeros(len(counts), 2, dtype=cs.dtype, device=c.device)
    extent.scatter_reduce_(0, seg[:, None].expand(-1, 2), cs[:, 2:4], "amax")
    grid = [(x + 1, y + 1) for x, y in extent.tolist()]
    samples = cs[first, 0].tolist()
    return Segments(order, inverse, cu, pos, grid, samples)
