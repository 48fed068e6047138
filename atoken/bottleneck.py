"""Latent bottlenecks: diagonal-Gaussian KL (continuous) and FSQ (discrete)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per token and channel."""

    def __init__(self, params: torch.Tensor):
        self.mean, self.logvar = params.chunk(2, dim=-1)
        self.logvar_clamped = self.logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar_clamped) * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to N(0, I), averaged over tokens (summed over channels)."""
        lv = self.logvar_clamped
        return 0.5 * (self.mean.pow(2) + lv.exp() - 1.0 - lv).sum(-1).mean()


class FSQ(nn.Module):
    """Finite scalar quantisation: `num_codebooks` groups of len(levels) channels; each channel bounded
    then rounded to one of its levels; one integer code per group (channel 0 least significant)."""

    def __init__(self, levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4), num_codebooks: int = 8, eps: float = 1e-3):
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        self.num_codebooks = num_codebooks
        lv = torch.tensor(self.levels, dtype=torch.float32)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + list(self.levels[:-1])), 0).float(),
                             persistent=False)
        self.half_l = (lv - 1) * (1 + eps) / 2
        self.offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        self.shift = torch.atanh(self.offset / self.half_l)
        self.half_width = torch.div(lv, 2, rounding_mode="floor")

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def _consts(self, x: torch.Tensor):
        return [t.to(x.device, torch.float32) for t in (self.half_l, self.offset, self.shift, self.half_width)]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z [L, G*D] -> (dequantised latents [L, G*D] with straight-through gradients, codes [L, G])."""
        half_l, offset, shift, half_width = self._consts(z)
        zg = z.float().reshape(len(z), self.num_codebooks, len(self.levels))
        bounded = torch.tanh(zg + shift) * half_l - offset
        digits = bounded + (torch.round(bounded) - bounded).detach()  # straight-through round
        deq = (digits / half_width).reshape(z.shape).type(z.dtype)
        codes = ((torch.round(bounded).detach() + half_width) * self._basis).sum(-1).long()
        return deq, codes

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [L, G] -> dequantised latents [L, G*D]; exact inverse of the code assignment."""
        lv = self._levels.long().to(codes.device)
        basis = self._basis.long().to(codes.device)
        digits = (codes[..., None] // basis) % lv
        half_width = torch.div(lv, 2, rounding_mode="floor")
        return ((digits - half_width).float() / half_width.float()).reshape(len(codes), -1)

    def latents_to_codes(self, latents: torch.Tensor) -> torch.Tensor:
        """Dequantised latents -> codes (no bounding: the inputs are already on the grid)."""
        half_width = self._consts(latents)[3]
        digits = torch.round(latents.float().reshape(len(latents), self.num_codebooks, -1) * half_width)
        return ((digits + half_width) * self._basis.to(latents.device)).sum(-1).long()
