"""Multiview rendering of a 3D Gaussian asset and voxel occupancy from the rendered depth.

V cameras on a Hammersley sphere (radius, field of view configurable) look at the unit cube the asset
was normalised into; `atoken.render` draws RGBA + expected depth (gsplat on CUDA, the CPU renderer
otherwise) on a black background; pixels with alpha > 0.5 are unprojected with their depth and the
G^3 voxels they fall in are occupied.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch and the renderer load only where 3D is rendered (decode workers stay light)
    import torch


@dataclass
class MultiviewPolicy:
    views: int = 8  # CPU default; the release example uses 16 views at 256^2
    resolution: int = 128
    radius: float = 2.0  # TRELLIS: radius 2, FoV 40
    fov_deg: float = 40.0
    grid: int = 64  # paper: 64^3
    alpha_threshold: float = 0.5
    device: str = "auto"

    def validate(self) -> "MultiviewPolicy":
        if self.views < 1:
            raise ValueError(f"threed.views={self.views} must be >= 1")
        if self.resolution < 16 or self.resolution % 16:
            raise ValueError(f"threed.resolution={self.resolution} must be a positive multiple of 16")
        if self.radius <= 0.87:
            raise ValueError(f"threed.radius={self.radius} must exceed the unit cube's half diagonal (0.87)")
        if not 1 < self.fov_deg < 179:
            raise ValueError(f"threed.fov_deg={self.fov_deg} must be in (1, 179)")
        if self.grid < 2:
            raise ValueError(f"threed.grid={self.grid} must be >= 2")
        return self


def render_multiview(g: dict[str, np.ndarray], policy: MultiviewPolicy) -> dict[str, np.ndarray]:
    """-> rgba uint8 [V,R,R,4], depth float16 [V,R,R], viewmats [V,4,4], Ks [V,3,3], voxels int16 [N,3]."""
    import torch

    from atoken.cameras import sphere_cameras
    from atoken.render import render

    dev = policy.device if policy.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    R = policy.resolution
    viewmats, Ks = sphere_cameras(policy.views, policy.radius, policy.fov_deg, R, R)
    t = {k: torch.as_tensor(g[k], device=dev) for k in ("means", "quats", "scales", "opacities", "colors")}
    with torch.no_grad():
        out = render(t["means"], t["quats"], t["scales"], t["opacities"], t["colors"], viewmats.to(dev), Ks.to(dev),
                     R, R, near_plane=0.05)
    rgb, alpha, depth = out.rgb.float().cpu(), out.alpha.float().cpu(), out.depth.float().cpu()
    rgba = torch.cat([rgb, alpha], -1).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    voxels = occupancy(depth[..., 0], alpha[..., 0], viewmats, Ks, policy.grid, policy.alpha_threshold)
    if len(voxels) == 0:
        raise ValueError("no voxel occupied: the asset is invisible from every camera")
    return {"rgba": rgba, "depth": depth[..., 0].numpy().astype(np.float16), "viewmats": viewmats.numpy(),
            "Ks": Ks.numpy(), "voxels": voxels.astype(np.int16), "backend": out.backend}


def occupancy(depth: "torch.Tensor", alpha: "torch.Tensor", viewmats: "torch.Tensor", Ks: "torch.Tensor", grid: int,
              threshold: float = 0.5) -> np.ndarray:
    """Unprojects pixels with alpha > threshold at their depth; returns the unique occupied voxels
    (x, y, z) of a grid^3 over [-0.5, 0.5]^3, sorted."""
    import torch

    V, H, W = depth.shape
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32) + 0.5, torch.arange(W, dtype=torch.float32) + 0.5,
                          indexing="ij")
    pts = []
    for i in range(V):
        m = (alpha[i] > threshold) & (depth[i] > 0)
        if not m.any():
            continue
        z = depth[i][m]
        pix = torch.stack([u[m] * z, v[m] * z, z], 1)
        cam = pix @ torch.linalg.inv(Ks[i]).T
        c2w = torch.linalg.inv(viewmats[i])
        pts.append(cam @ c2w[:3, :3].T + c2w[:3, 3])
    if not pts:
        return np.zeros((0, 3), np.int64)
    p = torch.cat(pts)
    idx = torch.floor((p + 0.5) * grid).long()
    idx = idx[((idx >= 0) & (idx < grid)).all(1)]
    return torch.unique(idx, dim=0).numpy()
