"""Transformer building blocks with the official module and parameter names.

Names (`to_qkv`, `q_rms_norm.gamma`, `mlp.mlp.0`, `pos_embedder.position_embedding`, ...) match the
official release so its state_dict loads without renaming (docs/model.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoken.attention import varlen_attention


class TrimmableLinear(nn.Linear):
    """nn.Linear that also reads only the leading columns of its input and gives only the leading rows
    of its output. Images and 3D voxels fill one frame of the 4-frame patch: in a batch of only those
    the other three frames are zeros in and unused out, and skipping them cuts ~45% of the tiny
    preset's arithmetic (the encoder's input and the decoder's output layer are 3,072 wide)."""

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        k, n = x.shape[-1], out_features or self.out_features
        if k == self.in_features and n == self.out_features:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight[:n, :k], None if self.bias is None else self.bias[:n])


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (bf16 activations keep fp32 statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class RMSNorm32(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type(x.dtype)


class MultiHeadRMSNorm(nn.Module):
    """Per-head QK-norm of the official decoder: L2-normalise each head vector, times gamma * sqrt(D)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.scale = math.sqrt(head_dim)
        self.gamma = nn.Parameter(torch.ones(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [L, H, D]
        return (F.normalize(x.float(), dim=-1) * self.gamma * self.scale).type(x.dtype)


def make_norm(dim: int, rms: bool, eps: float) -> nn.Module:
    return RMSNorm32(dim, eps) if rms else LayerNorm32(dim, eps=eps)


class RotaryEmbedding4D:
    """4D RoPE: head_dim/8 frequencies per axis (t, x, y, z), theta^(-j/head_dim), adjacent-pair complex
    layout with slots [t | x | y | z]. Parameter-free; applied in float32."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        self.head_dim = head_dim
        n = head_dim // 8
        self.freqs = theta ** (-torch.arange(n, dtype=torch.float64) / head_dim)  # [n]

    def angles(self, pos: torch.Tensor) -> torch.Tensor:
        """pos [L, 4] -> complex rotations [L, 4n]."""
        f = self.freqs.to(pos.device, torch.float32)
        ang = (pos.float()[:, :, None] * f[None, None, :]).reshape(len(pos), -1)  # [L, 4n], axis-major
        return torch.polar(torch.ones_like(ang), ang)

    @staticmethod
    def apply(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x [L, H, D] rotated by rot [L, D/2] (complex)."""
        xf = x.float().reshape(*x.shape[:-1], -1, 2)
        xc = torch.view_as_complex(xf.contiguous())
        out = torch.view_as_real(xc * rot[:, None, :]).reshape(x.shape)
        return out.type(x.dtype)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=bias), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the release's layout (mlp.0 / mlp.2) called layer by layer: under ZeRO-3 every module that runs gets
        # fetch/release hooks and autograd nodes, and the container and the activation have no parameters
        fc1, act, fc2 = self.mlp
        return fc2(F.gelu(fc1(x), approximate=act.approximate))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)
        if qk_norm:
            self.q_rms_norm = MultiHeadRMSNorm(heads, self.head_dim)
            self.k_rms_norm = MultiHeadRMSNorm(heads, self.head_dim)
        self.qk_norm = qk_norm

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q, k, v [L, H, D], after the optional QK-norm and before RoPE."""
        q, k, v = self.to_qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        if self.qk_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return q, k, v

    def forward(self, x: torch.Tensor, rot: torch.Tensor, cu: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x)
        q, k = RotaryEmbedding4D.apply(q, rot), RotaryEmbedding4D.apply(k, rot)
        return self.to_out(varlen_attention(q, k, v, cu).reshape(x.shape[0], -1))

    def forward_cached(self, x: torch.Tensor, pos: torch.Tensor, rope: "RotaryEmbedding4D",
                       cache: "KVCache | None") -> tuple[torch.Tensor, "KVCache"]:
        """One temporal tile attending to itself plus the cached (pre-RoPE) K/V of earlier frames,
        whose t positions are already relative to this tile (negative)."""
        q, k, v = self.qkv(x)
        full = KVCache(k, v, pos) if cache is None else KVCache(torch.cat([cache.k, k]), torch.cat([cache.v, v]),
                                                                  torch.cat([cache.pos, pos]))
        qr = RotaryEmbedding4D.apply(q, rope.angles(pos))
        kr = RotaryEmbedding4D.apply(full.k, rope.angles(full.pos))
        out = F.scaled_dot_product_attention(qr.transpose(0, 1)[None], kr.transpose(0, 1)[None],
                                             full.v.transpose(0, 1)[None], scale=self.head_dim ** -0.5)
        return self.to_out(out[0].transpose(0, 1).reshape(x.shape[0], -1)), KVCache(k, v, pos)


@dataclass
class KVCache:
    k: torch.Tensor  # [L, H, D] pre-RoPE
    v: torch.Tensor
    pos: torch.Tensor  # [L, 4]

    def keep_last(self, frames: int, tile: int) -> "KVCache | None":
        """The last `frames` latent frames, re-based so the next tile starts at t = 0."""
        if frames <= 0:
            return None
        m = self.pos[:, 0] >= tile - frames
        pos = self.pos[m].clone()
        pos[:, 0] -= tile
        return KVCache(self.k[m], self.v[m], pos)


class TransformerBlock(nn.Module):
    """Pre-norm block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp: int, bias: bool, rms: bool, qk_norm: bool, eps: float):
        super().__init__()
        self.norm1 = make_norm(dim, rms, eps)
        self.attn = SelfAttention(dim, heads, bias, qk_norm)
        self.norm2 = make_norm(dim, rms, eps)
        self.mlp = FeedForward(dim, mlp, bias)

    def forward(self, x: torch.Tensor, rot: torch.Tensor, cu: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rot, cu)
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x: torch.Tensor, pos: torch.Tensor, rope: RotaryEmbedding4D,
                       cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        a, kv = self.attn.forward_cached(self.norm1(x), pos, rope, cache)
        x = x + a
        return x + self.mlp(self.norm2(x)), kv


class LearnedPositionEmbedder(nn.Module):
    """SigLIP2-style learned 2D table (grid x grid), resized per segment to its (max x + 1, max y + 1)
    with antialiased bilinear interpolation, looked up at (x, y)."""

    def __init__(self, dim: int, grid: int = 16):
        super().__init__()
        self.grid = grid
        self.position_embedding = nn.Embedding(grid * grid, dim)

    def forward(self, pos: torch.Tensor, cu: list[int], grids: list[tuple[int, int]]) -> torch.Tensor:
        """One resized table per distinct grid, stacked, and one lookup for every token (a lookup per
        segment cost ~2.6 ms a step forward and backward for a batch of 20 photos)."""
        table = self.position_embedding.weight.float()
        dim = table.shape[1]
        if len(cu) < 2:
            return table.new_empty(0, dim).type(self.position_embedding.weight.dtype)
        base = table.reshape(self.grid, self.grid, dim).permute(2, 0, 1)[None]
        offsets: dict[tuple[int, int], int] = {}
        tables = []
        for g in grids:
            if g not in offsets:
                offsets[g] = sum(a * b for a, b in offsets)
                t = base if g == (self.grid, self.grid) else F.interpolate(base, size=g, mode="bilinear",
                                                                          align_corners=False, antialias=True)
                tables.append(t[0].reshape(dim, -1).T)  # [gh * gw, dim], row x * gw + y
        lengths = torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:])], device=pos.device)
        start = torch.repeat_interleave(torch.tensor([offsets[g] for g in grids], device=pos.device), lengths)
        width = torch.repeat_interleave(torch.tensor([g[1] for g in grids], device=pos.device), lengths)
        index = start + pos[:, 1].long() * width + pos[:, 2].long()
        out = F.embedding(index, torch.cat(tables) if len(tables) > 1 else tables[0])
        return out.type(self.position_embedding.weight.dtype)


class AttentionPoolingHead(nn.Module):
    """SigLIP MAP head: one learned probe cross-attends over a sample's tokens (no RoPE), then
    out = o + mlp(LayerNorm(o))."""

    def __init__(self, dim: int, heads: int, mlp: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.probe = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.attention = nn.Module()
        self.attention.to_q = nn.Linear(dim, dim)
        self.attention.to_kv = nn.Linear(dim, 2 * dim)
        self.attention.to_out = nn.Linear(dim, dim)
        self.layernorm = LayerNorm32(dim, eps=eps)
        self.mlp = FeedForward(dim, mlp, True)

    def forward(self, x: torch.Tensor, sample_cu: list[int]) -> torch.Tensor:
        """x [L, C] in sample order; returns [B, C] (unnormalised)."""
        H, D = self.heads, self.head_dim
        q = self.attention.to_q(self.probe).view(1, H, 1, D)
        kv = self.attention.to_kv(x).view(len(x), 2, H, D)
        pooled = kv.new_empty(len(sample_cu) - 1, H * D)
        by_len: dict[int, list[int]] = {}  # samples of equal token count pooled in one call
        for i, (a, b) in enumerate(zip(sample_cu[:-1], sample_cu[1:])):
            by_len.setdefault(b - a, []).append(i)
        for n, rows in by_len.items():
            starts = torch.tensor([sample_cu[i] for i in rows], device=x.device)
            idx = (starts[:, None] + torch.arange(n, device=x.device)[None]).reshape(-1)
            k = kv[idx, 0].view(len(rows), n, H, D).transpose(1, 2)
            v = kv[idx, 1].view(len(rows), n, H, D).transpose(1, 2)
            att = F.scaled_dot_product_attention(q.to(k.dtype).expand(len(rows), H, 1, D), k, v)
            pooled[torch.tensor(rows, device=x.device)] = att.reshape(len(rows), H * D)
        o = self.attention.to_out(pooled)
        return o + self.mlp(self.layernorm(o))
