"""Space-time patchify: pixels <-> packed 4x16x16 tokens, and voxel features -> 3D tokens.

Token layout (official): a 4x16x16x3 block flattened as (frame-in-patch, row, col, channel), channel
fastest. Pixel tokens are ordered t, then x (patch row), then y (patch column). Images get 3 zero frames
(0 in [-1, 1] space); the decoder keeps frame 0. H and W are centre-cropped to multiples of the patch
size (offset excess // 2); frames are cut to a multiple of 4. 3D voxels carry the RGB patch in the
frame-0 slot with zeros elsewhere and coords [b, 1, x, y, z].
"""
from __future__ import annotations

import functools

import torch

from atoken.sparse import SparseBatch

THREE_D_T = 1  # the official release puts 3D tokens at t = 1 (the paper says 0; RoPE is relative)


def center_crop_hw(x: torch.Tensor, p: int) -> torch.Tensor:
    """Crops [..., H, W, C] to multiples of p around the centre."""
    H, W = x.shape[-3], x.shape[-2]
    h, w = H - H % p, W - W % p
    if h == 0 or w == 0:
        raise ValueError(f"frame of {H}x{W} is smaller than one {p}x{p} patch")
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w, :]


def _pixel_grid(x: torch.Tensor, patch: tuple[int, int, int]) -> tuple[torch.Tensor, int, int, int]:
    """A video [T, H, W, C] cut to whole patches (T to a multiple of pt, H and W around the centre) and
    its token grid (nt, nx, ny)."""
    pt, ph, pw = patch
    if ph != pw:
        raise ValueError("patch height and width must match")
    T = x.shape[0] - x.shape[0] % pt
    if T == 0:
        raise ValueError(f"video of {x.shape[0]} frames is shorter than one {pt}-frame patch")
    v = center_crop_hw(x[:T], ph)
    return v, T // pt, v.shape[1] // ph, v.shape[2] // pw


def _write_pixel_tokens(dst: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], p: int) -> None:
    """Copies whole-patch frames v [nt*f, H, W, C] into dst [nt*nx*ny, >= f*p*p*C] in the token layout,
    in one strided copy: the f frames fill the leading (frame-in-patch) slots of each token."""
    nt, nx, ny = grid
    f, C = v.shape[0] // nt, v.shape[-1]
    src = v.reshape(nt, f, nx, p, ny, p, C).permute(0, 2, 4, 1, 3, 5, 6)
    dst[:, : f * p * p * C].view(nt, nx, ny, f, p, p, C).copy_(src)


@functools.lru_cache(maxsize=512)
def _grid_positions(nt: int, nx: int, ny: int) -> torch.Tensor:
    """[n, 4] int32 (t, x, y, 0) of a token grid, ordered t, then x, then y (read-only: shared)."""
    t, x, y = torch.meshgrid(torch.arange(nt), torch.arange(nx), torch.arange(ny), indexing="ij")
    return torch.stack([t, x, y, torch.zeros_like(t)], -1).reshape(-1, 4).int()


def video_to_tokens(video: torch.Tensor, patch: tuple[int, int, int] = (4, 16, 16),
                    batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """video [T, H, W, 3] in [-1, 1] -> feats [N, pt*ph*pw*3], coords [N, 5], kept (T, H, W)."""
    return _one(pack([("video", video)], patch), batch_index)


def image_to_tokens(image: torch.Tensor, patch: tuple[int, int, int] = (4, 16, 16),
                    batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """image [H, W, 3] in [-1, 1] -> tokens of one zero-padded 4-frame patch row."""
    return _one(pack([("image", image)], patch), batch_index)


def _one(batch: SparseBatch, batch_index: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    batch.coords[:, 0] = batch_index
    return batch.feats, batch.coords, batch.shapes[0]


def tokens_to_video(feats: torch.Tensor, coords: torch.Tensor, shape: tuple[int, int, int],
                    patch: tuple[int, int, int] = (4, 16, 16)) -> torch.Tensor:
    """Exact inverse of video_to_tokens for one sample; shape is the kept (T, H, W). T == 1 keeps frame 0.
    Tokens of one frame (a batch packed with trim_padding) give that frame."""
    pt, ph, pw = patch
    T, H, W = shape
    f = feats.shape[1] // (ph * pw * 3)  # frames per token: pt, or 1 when trimmed
    nt, nx, ny = max(T // pt, 1), H // ph, W // pw
    out = feats.new_zeros(nt, nx, ny, f, ph, pw, 3)
    c = coords.long()
    out[c[:, 1] - c[:, 1].min(), c[:, 2], c[:, 3]] = feats.reshape(-1, f, ph, pw, 3)
    video = out.permute(0, 3, 1, 4, 2, 5, 6).reshape(nt * f, nx * ph, ny * pw, 3)
    return video[:1] if T == 1 else video


def pack(samples: list[tuple[str, torch.Tensor]], patch: tuple[int, int, int] = (4, 16, 16),
         in_channels: int = 3072, trim_padding: bool = False) -> SparseBatch:
    """Packs (modality, tensor) samples: image [H,W,3], video [T,H,W,3] in [-1, 1]; 3d as a tuple
    (voxel_feats [N,768] in [0,1], voxel_coords [N,3]). Every sample is written once into one zeroed
    buffer (a training step's pack was ~1.2 ms per photo through per-sample tensors and a final cat).
    With `trim_padding`, a batch of only images and 3D voxels keeps their one frame: [L, ph*pw*3]
    instead of the 4-frame patch's zeros beside it (the model reads and writes such tokens narrow)."""
    pt, ph, pw = patch
    if trim_padding and all(m in ("image", "3d") for m, _ in samples):
        pt, in_channels = 1, ph * pw * 3
    plan, dtype, width = [], None, None  # (modality, cut pixels or voxel tuple, grid or None, tokens)
    for i, (modality, x) in enumerate(samples):
        if modality in ("image", "video"):
            v, *grid = _pixel_grid(x[None], (1, ph, pw)) if modality == "image" else _pixel_grid(x, patch)
            plan.append((modality, v, tuple(grid), grid[0] * grid[1] * grid[2]))
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
            w = pt * ph * pw * x.shape[-1]
        elif modality == "3d":
            plan.append((modality, x, None, len(x[1])))
            dtype = torch.float32 if dtype is None else torch.promote_types(dtype, torch.float32)
            w = in_channels
        else:
            raise ValueError(f"sample {i}: unknown modality {modality!r}")
        if width is not None and w != width:
            raise ValueError(f"sample {i}: {modality} tokens of {w} channels beside tokens of {width}")
        width = w
    feats = torch.zeros(sum(p[3] for p in plan), width or in_channels, dtype=dtype or torch.float32)
    coords = torch.empty(len(feats), 5, dtype=torch.int32)
    shapes, o = [], 0
    for b, (modality, x, grid, n) in enumerate(plan):
        if modality == "3d":
            vf, vc = x
            feats[o:o + n, : vf.shape[1]] = vf.float() * 2 - 1
            coords[o:o + n, 0], coords[o:o + n, 1], coords[o:o + n, 2:] = b, THREE_D_T, vc.int()
            shapes.append(None)
        else:
            _write_pixel_tokens(feats[o:o + n], x, grid, ph)
            coords[o:o + n, 0], coords[o:o + n, 1:] = b, _grid_positions(*grid)
            shapes.append((1 if modality == "image" else x.shape[0], x.shape[1], x.shape[2]))
        o += n
    return SparseBatch(feats, coords, [p[0] for p in plan], shapes)


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
    (row, col, channel) like an image patch, ready for `pack` as a 3d sample."""
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
