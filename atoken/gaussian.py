"""3D Gaussian decoder: per-voxel features -> K Gaussians per voxel, rendered with atoken.render.

Layout and parameter names follow the official `3d_decode_gs` model (a TRELLIS SLat-Gaussian decoder:
input_layer, swin-windowed RMSNorm blocks without bias, a parameter-free final LayerNorm, out_layer with
bias, and the `offset_perturbation` buffer), so its weights load by name. The number of blocks is
config; with 0 blocks it is the paper's "one extra layer" head.

Per voxel, out_layer's K·14 channels are [xyz offsets | DC colour | scale | rotation | opacity]:
position = voxel centre + tanh(offset·lr + perturbation)·voxel_size/(2·G), scale = softplus(s + b_s)
with a 3D filter, opacity = sigmoid(o + b_o), rotation = normalise(0.1·r + [1,0,0,0]), colour =
0.5 + C0·dc. Positions live in [-0.5, 0.5]^3, the unit cube 3D ingestion normalises assets into.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoken.cameras import radical_inverse
from atoken.layers import TransformerBlock
from atoken.render import RenderOutput, render
from atoken.sparse import segments

SH_C0 = 0.28209479177387814


@dataclass
class GaussianDecoderConfig:
    in_channels: int = 768  # the RGB patch (first 768 channels) of a reconstructed voxel token
    model_channels: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_channels: int = 3072
    window_size: int = 8
    resolution: int = 64
    gaussians_per_voxel: int = 32
    voxel_size: float = 1.5
    scaling_bias: float = 4e-3
    opacity_bias: float = 0.1
    filter_3d: float = 9e-4
    filter_2d: float = 0.1
    rotation_lr: float = 0.1

    def validate(self) -> "GaussianDecoderConfig":
        if self.num_blocks and (self.model_channels % self.num_heads or (self.model_channels // self.num_heads) % 2):
            raise ValueError(f"gaussian decoder: num_heads={self.num_heads} must divide model_channels into even head dims")
        if self.gaussians_per_voxel < 1:
            raise ValueError(f"gaussian decoder: gaussians_per_voxel={self.gaussians_per_voxel} must be >= 1")
        return self


def sinusoidal_3d(coords: torch.Tensor, channels: int) -> torch.Tensor:
    """Absolute sinusoidal embedding of integer (x, y, z): per axis [sin | cos] of channels//6 freqs."""
    n = channels // 3 // 2
    freqs = 1.0 / (10000 ** (torch.arange(n, dtype=torch.float32, device=coords.device) / n))
    ang = coords.float()[:, :, None] * freqs  # [L, 3, n]
    emb = torch.cat([ang.sin(), ang.cos()], -1).reshape(len(coords), -1)
    return F.pad(emb, (0, channels - emb.shape[1]))


@dataclass
class Gaussians:
    means: torch.Tensor  # [M, 3]
    quats: torch.Tensor  # [M, 4] wxyz, normalised
    scales: torch.Tensor  # [M, 3]
    opacities: torch.Tensor  # [M]
    colors: torch.Tensor  # [M, 3]
    sample: torch.Tensor  # [M] batch index

    def select(self, b: int) -> "Gaussians":
        m = self.sample == b
        return Gaussians(self.means[m], self.quats[m], self.scales[m], self.opacities[m], self.colors[m], self.sample[m])


class GaussianDecoder(nn.Module):
    def __init__(self, cfg: GaussianDecoderConfig = GaussianDecoderConfig()):
        super().__init__()
        self.cfg = cfg.validate()
        K, C = cfg.gaussians_per_voxel, cfg.model_channels
        self.input_layer = nn.Linear(cfg.in_channels, C, bias=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(C, cfg.num_heads, cfg.mlp_channels, bias=False, rms=True, qk_norm=False, eps=1e-6)
            for _ in range(cfg.num_blocks))
        self.out_layer = nn.Linear(C, K * 14)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)
        pts = torch.tensor([[i / K, radical_inverse(2, i), radical_inverse(3, i)] for i in range(K)])
        self.register_buffer("offset_perturbation", torch.atanh((pts * 2 - 1) / cfg.voxel_size))

    def _windows(self, coords: torch.Tensor, shift: int):
        """Swin windows over (x, y, z), shifted by `shift` voxels; one segment per (sample, window)."""
        w = self.cfg.window_size
        cell = torch.div(coords[:, 2:].long() + shift, w, rounding_mode="floor")
        n = int(cell.max()) + 1 if len(cell) else 1
        key = ((coords[:, 0].long() * n + cell[:, 0]) * n + cell[:, 1]) * n + cell[:, 2]
        fake = torch.stack([coords[:, 0].long(), key, torch.zeros_like(key), torch.zeros_like(key),
                            torch.zeros_like(key)], 1)
        return segments(fake, window=1)  # one "temporal window" per distinct key

    def forward(self, voxel_feats: torch.Tensor, coords: torch.Tensor) -> Gaussians:
        """voxel_feats [L, in_channels] (the voxel's RGB patch in [-1, 1]); coords [L, 5] (b, t, x, y, z)."""
        cfg = self.cfg
        h = self.input_layer(voxel_feats) + sinusoidal_3d(coords[:, 2:], cfg.model_channels).to(voxel_feats.dtype)
        for i, block in enumerate(self.blocks):
            seg = self._windows(coords, cfg.window_size // 2 if i % 2 else 0)
            x = h[seg.order]
            rot = torch.ones(len(x), (cfg.model_channels // cfg.num_heads) // 2, dtype=torch.complex64, device=x.device)
            y = block(x, rot, seg.cu)  # identity rotation: this model uses absolute positions, not RoPE
            h = y if seg.inverse is None else y[seg.inverse]
        h = F.layer_norm(h.float(), (h.shape[-1],)).type(h.dtype)
        return self.to_gaussians(self.out_layer(h), coords)

    def to_gaussians(self, out: torch.Tensor, coords: torch.Tensor) -> Gaussians:
        cfg, K = self.cfg, self.cfg.gaussians_per_voxel
        L = len(out)
        o = out.float()
        xyz_raw = o[:, : 3 * K].view(L, K, 3)
        dc = o[:, 3 * K: 6 * K].view(L, K, 3)
        sc = o[:, 6 * K: 9 * K].view(L, K, 3)
        rot = o[:, 9 * K: 13 * K].view(L, K, 4)
        op = o[:, 13 * K: 14 * K].view(L, K)
        centre = (coords[:, 2:].float() + 0.5) / cfg.resolution
        offset = torch.tanh(xyz_raw + self.offset_perturbation) / cfg.resolution * 0.5 * cfg.voxel_size
        means = (centre[:, None] + offset).reshape(-1, 3) - 0.5
        inv_softplus = math.log(math.expm1(cfg.scaling_bias))
        scales = F.softplus(sc + inv_softplus).reshape(-1, 3)
        scales_f = torch.sqrt(scales ** 2 + cfg.filter_3d ** 2)
        opac = torch.sigmoid(op + math.log(cfg.opacity_bias / (1 - cfg.opacity_bias))).reshape(-1)
        # mip-splatting 3D filter: widen the kernel and keep the integral
        opac = opac * torch.sqrt((scales ** 2).prod(-1) / (scales_f ** 2).prod(-1))
        quats = F.normalize(rot * cfg.rotation_lr + torch.tensor([1.0, 0, 0, 0], device=o.device), dim=-1).reshape(-1, 4)
        colors = (0.5 + SH_C0 * dc).reshape(-1, 3)
        sample = coords[:, 0].long().repeat_interleave(K)
        return Gaussians(means, quats, scales_f, opac, colors, sample)

    def save_pretrained(self, directory) -> None:
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(d / "gaussian_decoder.safetensors"))
        (d / "gaussian_decoder.json").write_text(json.dumps(self.cfg.__dict__, indent=1, sort_keys=True))

    @classmethod
    def from_pretrained(cls, directory) -> "GaussianDecoder":
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "gaussian_decoder.json").is_file():
            raise FileNotFoundError(f"{d}: no gaussian_decoder.json (expected a GaussianDecoder.save_pretrained dir)")
        dec = cls(GaussianDecoderConfig(**json.loads((d / "gaussian_decoder.json").read_text())))
        dec.load_state_dict(load_file(str(d / "gaussian_decoder.safetensors")), strict=True)
        return dec

    def render(self, g: Gaussians, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
               background: torch.Tensor | None = None, backend: str = "auto") -> RenderOutput:
        return render(g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks, width, height,
                      near_plane=0.01, background=background, backend=backend, eps2d=self.cfg.filter_2d)
