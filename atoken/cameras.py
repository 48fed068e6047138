"""Camera math shared by 3D ingestion and 3D training: Hammersley sphere sampling, look-at view
matrices (OpenCV convention: x right, y down, z forward), pinhole intrinsics from a field of view."""
from __future__ import annotations

import math

import torch


def radical_inverse(base: int, i: int) -> float:
    """Van der Corput radical inverse of i in `base` (Halton / Hammersley coordinates)."""
    f, result = 1.0 / base, 0.0
    while i:
        result += f * (i % base)
        i //= base
        f /= base
    return result


def hammersley_sphere(n: int, offset: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """n (yaw, pitch) pairs in radians on a Hammersley sequence, with the TRELLIS pitch mapping that
    favours the equator (u < 0.25 doubled, else u·2/3 + 1/3)."""
    out = []
    for i in range(n):
        u, v = i / n + offset[0], radical_inverse(2, i) + offset[1]
        u, v = u % 1.0, v % 1.0
        u = 2 * u if u < 0.25 else 2 / 3 * u + 1 / 3
        out.append((2 * math.pi * v, math.pi / 2 - math.acos(2 * u - 1)))
    return torch.tensor(out, dtype=torch.float64)


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up: tuple[float, float, float] = (0, 0, 1)) -> torch.Tensor:
    """World-to-camera 4x4 (OpenCV axes) for cameras at `eye` [V, 3] looking at `target`."""
    eye = eye.double()
    target = torch.zeros_like(eye) if target is None else target.double().expand_as(eye)
    fwd = torch.nn.functional.normalize(target - eye, dim=-1)
    upv = torch.tensor(up, dtype=torch.float64).expand_as(fwd)
    right = torch.linalg.cross(fwd, upv)
    bad = right.norm(dim=-1) < 1e-8  # looking straight along up: pick another up
    if bad.any():
        right[bad] = torch.linalg.cross(fwd[bad], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(fwd[bad]))
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd], 1)  # rows: camera axes in world coords
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(eye), 1, 1)
    w2c[:, :3, :3] = R
    w2c[:, :3, 3] = -(R @ eye[:, :, None])[:, :, 0]
    return w2c.float()


def intrinsics(fov_deg: float, width: int, height: int, n: int = 1) -> torch.Tensor:
    """Pinhole K [n, 3, 3] with the horizontal field of view `fov_deg`."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=torch.float32)
    return K.repeat(n, 1, 1)


def sphere_cameras(n: int, radius: float, fov_deg: float, width: int, height: int,
                   offset: tuple[float, float] = (0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """n cameras on a sphere of `radius` looking at the origin -> (viewmats [n,4,4], Ks [n,3,3])."""
    yp = hammersley_sphere(n, offset)
    yaw, pitch = yp[:, 0], yp[:, 1]
    eye = radius * torch.stack([torch.cos(yaw) * torch.cos(pitch), torch.sin(yaw) * torch.cos(pitch),
                                torch.sin(pitch)], -1)
    return look_at(eye), intrinsics(fov_deg, width, height, n)
