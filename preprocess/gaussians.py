"""INRIA 3D Gaussian-splat .ply files: header-first validation, parsing, normalisation.

The header is parsed and checked before any payload is read: required properties, SH degree 0-3 (0, 9,
24 or 45 `f_rest_*`), vertex count within a limit, and — for binary files — header + count x row size
equal to the file size (a truncated file or a header declaring a huge count is refused without
allocating for it). Values must be finite.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

SH_C0 = 0.28209479177387814
REQUIRED = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"]
PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


@dataclass
class GaussianPolicy:
    max_gaussians: int = 2_000_000
    max_header_bytes: int = 65536

    def validate(self) -> "GaussianPolicy":
        if self.max_gaussians < 1:
            raise ValueError(f"threed.max_gaussians={self.max_gaussians} must be >= 1")
        return self


@dataclass
class PlyHeader:
    fmt: str
    count: int
    props: list[tuple[str, str]]  # (name, numpy type)
    header_bytes: int

    @property
    def sh_degree(self) -> int:
        n = sum(1 for p, _ in self.props if p.startswith("f_rest_"))
        return {0: 0, 9: 1, 24: 2, 45: 3}[n]


def parse_header(data: bytes, policy: GaussianPolicy = GaussianPolicy()) -> PlyHeader:
    if not data:
        raise ValueError("empty file (0 bytes)")
    if not data.startswith(b"ply"):
        raise ValueError("not a PLY file (missing 'ply' magic)")
    end = data.find(b"end_header", 0, policy.max_header_bytes)
    if end < 0:
        raise ValueError(f"no end_header within the first {policy.max_header_bytes} bytes")
    nl = data.find(b"\n", end)
    header_bytes = (nl + 1) if nl >= 0 else len(data)
    fmt, count, props, element = None, None, [], None
    for raw in data[:end].decode("ascii", errors="replace").splitlines():
        parts = raw.split()
        if not parts or parts[0] in ("ply", "comment", "obj_info"):
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            element = parts[1]
            if element == "vertex":
                count = int(parts[2])
            elif int(parts[2]) > 0:
                raise ValueError(f"unexpected element '{element}' with {parts[2]} entries (a 3DGS file has only vertices)")
        elif parts[0] == "property" and element == "vertex":
            if parts[1] == "list":
                raise ValueError("list property in the vertex element (not a 3DGS file)")
            if parts[1] not in PLY_TYPES:
                raise ValueError(f"unknown property type {parts[1]!r}")
            props.append((parts[2], PLY_TYPES[parts[1]]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unsupported PLY format {fmt!r}")
    if count is None:
        raise ValueError("no vertex element")
    if count <= 0:
        raise ValueError("vertex element is empty")
    if count > policy.max_gaussians:
        raise ValueError(f"header declares {count} Gaussians, above threed.max_gaussians={policy.max_gaussians}")
    names = [p for p, _ in props]
    missing = [p for p in REQUIRED if p not in names]
    if missing:
        raise ValueError(f"missing required properties {missing}")
    n_rest = sum(1 for p in names if p.startswith("f_rest_"))
    if n_rest not in (0, 9, 24, 45):
        raise ValueError(f"{n_rest} f_rest_* properties: not SH degree 0-3 (0, 9, 24 or 45)")
    header = PlyHeader(fmt, count, props, header_bytes)
    if fmt != "ascii":
        row = sum(np.dtype(t).itemsize for _, t in props)
        expected = header_bytes + count * row
        if len(data) < expected:
            raise ValueError(f"truncated: {len(data)} bytes but the header declares {count} x {row} + "
                             f"{header_bytes} = {expected}")
        if len(data) > expected:
            raise ValueError(f"{len(data) - expected} bytes of trailing data after {count} vertices")
    return header


def read_3dgs(data: bytes, policy: GaussianPolicy = GaussianPolicy()) -> dict[str, np.ndarray]:
    """-> raw INRIA parameters: xyz [N,3], f_dc [N,3], f_rest [N,K], opacity [N] (logit), scale [N,3]
    (log), rot [N,4] (wxyz, unnormalised), sh_degree."""
    h = parse_header(data, policy)
    if h.fmt == "ascii":
        body = data[h.header_bytes:].decode("ascii", errors="replace").split("\n")
        lines = [ln for ln in body if ln.strip()]
        if len(lines) != h.count:
            raise ValueError(f"ASCII body has {len(lines)} vertex lines, header declares {h.count}")
        try:
            arr = np.loadtxt(io.StringIO("\n".join(lines)), dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise ValueError(f"malformed ASCII vertex data ({e})") from None
        if arr.shape[1] != len(h.props):
            raise ValueError(f"ASCII rows have {arr.shape[1]} values, header declares {len(h.props)} properties")
        cols = {name: arr[:, i] for i, (name, _) in enumerate(h.props)}
    else:
        endian = "<" if h.fmt == "binary_little_endian" else ">"
        dt = np.dtype([(n, endian + t) for n, t in h.props])
        rec = np.frombuffer(data, dtype=dt, count=h.count, offset=h.header_bytes)
        cols = {n: rec[n].astype(np.float64) for n, _ in h.props}
    bad = {n: int((~np.isfinite(v)).sum()) for n, v in cols.items() if not np.isfinite(v).all()}
    if bad:
        raise ValueError(f"non-finite values (NaN/Inf) in properties {bad}")
    n_rest = sum(1 for n, _ in h.props if n.startswith("f_rest_"))
    return {
        "xyz": np.stack([cols["x"], cols["y"], cols["z"]], 1),
        "f_dc": np.stack([cols[f"f_dc_{i}"] for i in range(3)], 1),
        "f_rest": np.stack([cols[f"f_rest_{i}"] for i in range(n_rest)], 1) if n_rest else np.zeros((h.count, 0)),
        "opacity": cols["opacity"],
        "scale": np.stack([cols[f"scale_{i}"] for i in range(3)], 1),
        "rot": np.stack([cols[f"rot_{i}"] for i in range(4)], 1),
        "sh_degree": np.array(h.sh_degree),
    }


def activate_normalised(g: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw parameters -> renderable Gaussians centred and scaled into the unit cube [-0.5, 0.5]^3
    (longest axis-aligned extent = 1). Colour is the DC term (view dependence is dropped)."""
    xyz = g["xyz"]
    lo, hi = xyz.min(0), xyz.max(0)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise ValueError("degenerate asset: all Gaussians at one point")
    rot = g["rot"]
    norm = np.linalg.norm(rot, axis=1, keepdims=True)
    if (norm < 1e-12).any():
        raise ValueError(f"{int((norm < 1e-12).sum())} zero-length rotation quaternions")
    return {
        "means": ((xyz - (lo + hi) / 2) / extent).astype(np.float32),
        "quats": (rot / norm).astype(np.float32),
        "scales": (np.exp(np.clip(g["scale"], -30, 10)) / extent).astype(np.float32),
        "opacities": (1 / (1 + np.exp(-np.clip(g["opacity"], -30, 30)))).astype(np.float32),
        "colors": np.clip(0.5 + SH_C0 * g["f_dc"], 0, 1).astype(np.float32),
        "extent": np.array(extent, np.float32),
    }
