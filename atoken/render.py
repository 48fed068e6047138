"""Differentiable 3D Gaussian rendering behind one function.

CUDA: gsplat's `rasterization`. CPU: gsplat's pure-torch projection (`_quat_scale_to_covar_preci`,
`_fully_fused_projection`) plus a tiled front-to-back alpha compositor with gsplat's rules: 3.33σ screen
radius culling, 16x16 tiles each compositing its own depth-sorted list, alpha = min(0.999, o·exp(-σ)),
contributions below 1/255 skipped, and a pixel stops once transmittance would fall to 1e-4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE = 16
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [V, H, W, 3]
    alpha: torch.Tensor  # [V, H, W, 1]
    depth: torch.Tensor  # [V, H, W, 1] expected depth (0 where alpha == 0)
    backend: str


def render(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
           colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
           near_plane: float = 0.01, far_plane: float = 1e10, background: torch.Tensor | None = None,
           backend: str = "auto", eps2d: float = 0.3) -> RenderOutput:
    """means [N,3], quats [N,4] wxyz (any norm), scales [N,3] (activated), opacities [N] in [0,1],
    colors [N,3]; viewmats [V,4,4] world-to-camera (OpenCV), Ks [V,3,3]."""
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "torch"
    if backend == "gsplat":
        return _render_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                              near_plane, far_plane, background, eps2d)
    if backend == "torch":
        return _render_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                             near_plane, far_plane, background, eps2d)
    raise ValueError(f"render backend={backend!r}: choose 'auto', 'gsplat' or 'torch'")


def _render_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near, far, bg, eps2d):
    from gsplat import rasterization

    V = len(viewmats)
    bgs = None if bg is None else bg.expand(V, 3)
    rc, ra, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                              near_plane=near, far_plane=far, eps2d=eps2d, backgrounds=bgs,
                              render_mode="RGB+ED", packed=False)
    return RenderOutput(rc[..., :3], ra, rc[..., 3:4] * (ra > 0), "gsplat")


def _render_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near, far, bg, eps2d):
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(F.normalize(quats, dim=-1), scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near, far_plane=far)
    V = len(viewmats)
    rgb = means.new_zeros(V, height, width, 3)
    alpha = means.new_zeros(V, height, width, 1)
    depth = means.new_zeros(V, height, width, 1)
    outs_rgb, outs_a, outs_d = [], [], []
    for v in range(V):
        r, a, d = _composite_view(radii[v], means2d[v], depths[v], conics[v], opacities, colors, width, height)
        outs_rgb.append(r)
        outs_a.append(a)
        outs_d.append(d)
    rgb, alpha, depth = torch.stack(outs_rgb), torch.stack(outs_a), torch.stack(outs_d)
    if bg is not None:
        rgb = rgb + (1 - alpha) * bg.view(1, 1, 1, 3)
    return RenderOutput(rgb, alpha, depth, "torch")


def _composite_view(radii, means2d, depths, conics, opacities, colors, width, height, tile_batch: int = 64):
    """One view: bin Gaussians into 16x16 tiles, composite each tile over its depth-sorted list."""
    dev, dtype = means2d.device, means2d.dtype
    tw, th = (width + TILE - 1) // TILE, (height + TILE - 1) // TILE
    visible = (radii > 0).all(-1)
    idx = torch.nonzero(visible).squeeze(1)
    idx = idx[torch.argsort(depths[idx].detach(), stable=True)]  # front to back
    m = means2d[idx].detach()
    rad = radii[idx].to(dtype)
    x0 = ((m[:, 0] - rad[:, 0]) / TILE).floor().clamp(0, tw).long()
    x1 = ((m[:, 0] + rad[:, 0]) / TILE).floor().clamp(-1, tw - 1).long()
    y0 = ((m[:, 1] - rad[:, 1]) / TILE).floor().clamp(0, th).long()
    y1 = ((m[:, 1] + rad[:, 1]) / TILE).floor().clamp(-1, th - 1).long()
    # (tile, gaussian) pairs in depth order
    pairs_t, pairs_g = [], []
    nx, ny = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    counts = nx * ny
    if counts.sum() > 0:
        g = torch.repeat_interleave(torch.arange(len(idx), device=dev), counts)
        start = torch.cumsum(counts, 0) - counts
        k = torch.arange(int(counts.sum()), device=dev) - torch.repeat_interleave(start, counts)
        gx = x0[g] + k % nx[g]
        gy = y0[g] + torch.div(k, nx[g], rounding_mode="floor")
        tile_id = gy * tw + gx
        order = torch.argsort(tile_id * len(idx) + g, stable=True)  # by tile, then depth rank
        pairs_t, pairs_g = tile_id[order], g[order]
    rgb = means2d.new_zeros(th * TILE, tw * TILE, 3)
    acc = means2d.new_zeros(th * TILE, tw * TILE, 1)
    dep = means2d.new_zeros(th * TILE, tw * TILE, 1)
    if len(pairs_t) == 0:
        return rgb[:height, :width], acc[:height, :width], dep[:height, :width]
    tiles, tcounts = torch.unique_consecutive(pairs_t, return_counts=True)
    tstart = torch.cumsum(tcounts, 0) - tcounts
    py, px = torch.meshgrid(torch.arange(TILE, device=dev, dtype=dtype), torch.arange(TILE, device=dev, dtype=dtype),
                            indexing="ij")
    pix = torch.stack([px.reshape(-1), py.reshape(-1)], -1) + 0.5  # pixel centres, [256, 2]
    gidx = idx  # gaussian index into the full arrays, by depth rank
    out_rgb, out_a, out_d, tile_list = [], [], [], []
    for b in range(0, len(tiles), tile_batch):
        tb, cb, sb = tiles[b:b + tile_batch], tcounts[b:b + tile_batch], tstart[b:b + tile_batch]
        K = int(cb.max())
        ar = torch.arange(K, device=dev)
        valid = ar[None, :] < cb[:, None]  # [B, K]
        sel = pairs_g[(sb[:, None] + ar[None, :]).clamp(max=len(pairs_g) - 1)]  # [B, K] depth ranks
        gi = gidx[sel]
        origin = torch.stack([(tb % tw) * TILE, torch.div(tb, tw, rounding_mode="floor") * TILE], -1).to(dtype)
        p = origin[:, None, :] + pix[None]  # [B, 256, 2]
        d = means2d[gi][:, None, :, :] - p[:, :, None, :]  # [B, 256, K, 2]
        c = conics[gi][:, None]  # [B, 1, K, 3]
        sigma = 0.5 * (c[..., 0] * d[..., 0] ** 2 + c[..., 2] * d[..., 1] ** 2) + c[..., 1] * d[..., 0] * d[..., 1]
        a = (opacities[gi][:, None, :] * torch.exp(-sigma)).clamp(max=ALPHA_MAX)
        a = a * (valid[:, None, :] & (sigma >= 0) & (a >= ALPHA_MIN))
        # stop once transmittance would fall to T_MIN (that Gaussian and all behind it excluded)
        t_after = torch.cumprod(1 - a.detach(), -1)
        keep = torch.cumsum((t_after <= T_MIN).to(torch.int32), -1) == 0
        a = a * keep
        T = torch.cumprod(torch.cat([torch.ones_like(a[..., :1]), 1 - a[..., :-1]], -1), -1)
        w = a * T  # [B, 256, K]
        out_rgb.append(torch.einsum("bpk,bkc->bpc", w, colors[gi]))
        out_a.append(w.sum(-1, keepdim=True))
        out_d.append(torch.einsum("bpk,bk->bp", w, depths[gi])[..., None])
        tile_list.append(tb)
    tb = torch.cat(tile_list)
    r, a, dd = torch.cat(out_rgb), torch.cat(out_a), torch.cat(out_d)
    # scatter tiles into the image
    full_rgb = means2d.new_zeros(th * tw, TILE * TILE, 3).index_put((tb,), r)
    full_a = means2d.new_zeros(th * tw, TILE * TILE, 1).index_put((tb,), a)
    full_d = means2d.new_zeros(th * tw, TILE * TILE, 1).index_put((tb,), dd)
    untile = lambda t, ch: t.view(th, tw, TILE, TILE, ch).permute(0, 2, 1, 3, 4).reshape(th * TILE, tw * TILE, ch)  # noqa: E731
    rgb, acc = untile(full_rgb, 3), untile(full_a, 1)
    dep = untile(full_d, 1) / acc.clamp_min(1e-10) * (acc > 0)
    return rgb[:height, :width], acc[:height, :width], dep[:height, :width]
