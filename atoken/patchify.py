"""Space-time patchify: pixels <-> packed 4x16x16 tokens, and voxel features -> 3D tokens.

Token layout (official): a 4x16x16x3 block flattened as (frame-in-patch, row, col, channel), channel
fastest. Pixel tokens are ordered t, then x (patch row), then y (patch column). Images get 3 zero frames
(0 in [-1, 1] space); the decoder keeps frame 0. H and W are centre-cropped to multiples of the patch
size (offset excess // 2); frames are cut to a multiple of 4. 3D voxels carry the RGB patch in the
frame-0 slot with zeros elsewhere and coords [b, 1, x, y, z].
"""
from __future__ import annotations

import torch

from atoken.sparse import SparseBatch, concat

THREE_D_T = 1  # the official release puts 3D tokens at t = 1 (the paper says 0; RoPE is relative)


def center_crop_hw(x: torch.Tensor, p: int) -> torch.Tensor:
    """Crops [..., H, W, C] to multiples of p around the centre."""
    H, W = x.shape[-3], x.shape[-2]
    h, w = H - H % p, W - W % p
    if h == 0 or w == 0:
        raise ValueError(f"frame of {H}x{W} is smaller than one {p}x{p} patch")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w, :]


def video_to_tokens(video: torch.Tensor, patch: tuple[int, int, int] = (4, 16, 16),
                    batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """video [T, H, W, 3] in [-1, 1] -> feats [N, pt*ph*pw*3], coords [N, 5], kept (T, H, W)."""
    pt, ph, pw = patch
    if ph != pw:
        raise ValueError("patch height and width must match")
    T = video.shape[0] - video.shape[0] % pt
    if T == 0:
        raise ValueError(f"video of {video.shape[0]} frames is shorter than one {pt}-frame patch")
    v = center_crop_hw(video[:T], ph)
    _, H, W, C = v.shape
    nt, nx, ny = T // pt, H // ph, W // pw
    tok = v.reshape(nt, pt, nx, ph, ny, pw, C).permute(0, 2, 4, 1, 3, 5, 6).reshape(nt * nx * ny, -1)
    t, x, y = torch.meshgrid(torch.arange(nt), torch.arange(nx), torch.arange(ny), indexing="ij")
    coords = torch.stack([torch.full_like(t, batch_index), t, x, y, torch.zeros_like(t)], -1).reshape(-1, 5)
    return tok, coords.int(), (T, H, W)


def image_to_tokens(image: torch.Tensor, patch: tuple[int, int, int] = (4, 16, 16),
                    batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """image [H, W, 3] in [-1, 1] -> tokens of one zero-padded 4-frame patch row."""
    pad = image.new_zeros((patch[0] - 1, *image.shape))
    feats, coords, (_, H, W) = video_to_tokens(torch.cat([image[None], pad]), patch, batch_index)
    return feats, coords, (1, H, W)


def tokens_to_video(feats: torch.Tensor, coords: torch.Tensor, shape: tuple[int, int, int],
                    patch: tuple[int, int, int] = (4, 16, 16)) -> torch.Tensor:
    """Exact inverse of video_to_tokens for one sample; shape is the kept (T, H, W). T == 1 keeps frame 0."""
    pt, ph, pw = patch
    T, H, W = shape
    nt, nx, ny = max(T // pt, 1), H // ph, W // pw
    out = feats.new_zeros(nt, nx, ny, pt, ph, pw, 3)
    c = coords.long()
    out[c[:, 1] - c[:, 1].min(), c[:, 2], c[:, 3]] = feats.reshape(-1, pt, ph, pw, 3)
    video = out.permute(0, 3, 1, 4, 2, 5, 6).reshape(nt * pt, nx * ph, ny * pw, 3)
    return video[:1] if T == 1 else video


def voxels_to_tokens(voxel_feats: torch.Tensor, voxel_coords: torch.Tensor, in_channels: int = 3072,
                     batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """voxel_feats [N, 768] in [0, 1] (a 16x16 RGB patch per voxel), voxel_coords [N, 3] (x, y, z)."""
    f = voxel_feats.float() * 2 - 1
    feats = torch.cat([f, f.new_zeros(len(f), in_channels - f.shape[1])], 1)
    n = len(voxel_coords)
    lead = torch.tensor([batch_index, THREE_D_T], dtype=torch.int32).expand(n, 2)
    return feats, torch.cat([lead, voxel_coords.int()], 1)


def pack(samples: list[tuple[str, torch.Tensor]], patch: tuple[int, int, int] = (4, 16, 16),
         in_channels: int = 3072) -> SparseBatch:
    """Packs (modality, tensor) samples: image [H,W,3], video [T,H,W,3] in [-1, 1]; 3d as a tuple
    (voxel_feats [N,768] in [0,1], voxel_coords [N,3])."""
    parts = []
    for i, (modality, x) in enumerate(samples):
        if modality == "image":
            f, c, shape = image_to_tokens(x, patch)
        elif modality == "video":
            f, c, shape = video_to_tokens(x, patch)
        elif modality == "3d":
            f, c = voxels_to_tokens(x[0], x[1], in_channels)
            shape = None
        else:
            raise ValueError(f"sample {i}: unknown modality {modality!r}")
        parts.append(SparseBatch(f, c, [modality], [shape]))
    return concat(parts)


def unpack(batch: SparseBatch, feats: torch.Tensor | None = None,
           patch: tuple[int, int, int] = (4, 16, 16)) -> list[torch.Tensor]:
    """Per-sample pixels [T, H, W, 3] (images T=1) or, for 3D, the [N, 768] voxel patch (first frame)."""
    sb = batch if feats is None else batch.with_feats(feats)
    out = []
    for i in range(sb.num_samples):
        f, c = sb.sample(i)
        if sb.modalities[i] == "3d":
            out.append(f[:, : patch[1] * patch[2] * 3])
        else:
            out.append(tokens_to_video(f, c, sb.shapes[i], patch))
    return out


def voxel_centers(voxel_coords: torch.Tensor, grid: int) -> torch.Tensor:
    """Integer voxel coords of a grid^3 over [-0.5, 0.5]^3 -> world-space centres [N, 3]."""
    return (voxel_coords.float() + 0.5) / grid - 0.5


def voxel_features_from_views(views: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                              voxel_coords: torch.Tensor, grid: int, patch: int = 16) -> torch.Tensor:
    """Each occupied voxel takes the patch x patch RGB patch of its nearest view (paper Fig. 3; the
    release picks the smallest projected depth, with no occlusion test) at the patch its centre
    projects into. views [V, H, W, 3] in [0, 1] -> features [N, patch*patch*3] in [0, 1], flattened
    (row, col, channel) like an image patch, ready for voxels_to_tokens."""
    V, H, W, C = views.shape
    gh, gw = H // patch, W // patch
    tiles = views[:, : gh * patch, : gw * patch].reshape(V, gh, patch, gw, patch, C).permute(0, 1, 3, 2, 4, 5)
    tiles = tiles.reshape(V, gh, gw, patch * patch * C)
    centres = voxel_centers(voxel_coords, grid)
    homo = torch.cat([centres, torch.ones(len(centres), 1)], 1)
    cam = torch.einsum("vij,nj->vni", viewmats.float(), homo)[..., :3]  # [V, N, 3]
    depth = cam[..., 2]
    uvw = torch.einsum("vij,vnj->vni", Ks.float(), cam)
    u, v = uvw[..., 0] / uvw[..., 2].clamp_min(1e-8), uvw[..., 1] / uvw[..., 2].clamp_min(1e-8)
    inside = (depth > 0) & (u >= 0) & (u < gw * patch) & (v >= 0) & (v < gh * patch)
    best = torch.where(inside, depth, torch.full_like(depth, float("inf"))).argmin(0)  # [N]
    n = torch.arange(len(centres))
    px = (u[best, n] / patch).floor().long().clamp(0, gw - 1)
    py = (v[best, n] / patch).floor().long().clamp(0, gh - 1)
    return tiles[best, py, px]
