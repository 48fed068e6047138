"""One partition -> one committed shard. Each sample is decoded (images, video clips) or rendered (3D);
a bad sample becomes a quarantine row with its reason and the rest of the partition is still written.

Commit order: sidecar, quarantine, then the shard itself; a shard's existence means all three exist.
"""
from __future__ import annotations

import json
import time

import numpy as np

from pipelines.config import IngestConfig
from pipelines.shards import ShardWriter, shard_uri, write_quarantine
from pipelines.specs import reject
from preprocess import storage
from preprocess.gaussians import activate_normalised, read_3dgs
from preprocess.images import decode_image
from preprocess.multiview import render_multiview
from preprocess.schema import encode_pixels
from preprocess.video import ClipReader


def _base_row(spec: dict) -> dict:
    return {"sample_id": spec["sample_id"], "item_id": spec["item_id"], "uri": spec["uri"], "modality": spec["modality"],
            "split": spec["split"], "caption": spec["caption"], "label": spec["label"], "dataset": spec.get("dataset", ""),
            "clip_index": spec.get("clip_index", 0), "frame_indices": spec.get("frame_indices"), "fps": spec.get("fps")}


class _OpenVideos:
    """Keeps the current video open across consecutive clip specs of a partition (specs are sorted, so
    a video's clips are adjacent): one download / open per video instead of one per clip."""

    def __init__(self):
        self.key, self.reader, self._ctx = None, None, None

    def get(self, uri: str, size: tuple[int, int]) -> ClipReader:
        if self.key != (uri, size):
            self.close()
            self._ctx = storage.local_path(uri)
            self.reader, self.key = ClipReader(self._ctx.__enter__(), size), (uri, size)
        return self.reader

    def close(self) -> None:
        if self._ctx is not None:
            self.reader.close()
            self._ctx.__exit__(None, None, None)
        self.key, self.reader, self._ctx = None, None, None


def sample_row(spec: dict, cfg: IngestConfig, videos: _OpenVideos | None = None) -> tuple[dict, int]:
    """-> (shard row, frames produced). Raises ValueError with the problem on bad input."""
    row = _base_row(spec)
    enc = cfg.shard.encoding
    if spec["modality"] == "image":
        arr = decode_image(storage.read_bytes(spec["uri"], cfg.resources.max_bytes_per_file), cfg.image)[None]
        row.update(frames=1, height=arr.shape[1], width=arr.shape[2], channels=3, pixel_encoding=enc,
                   pixels=encode_pixels(arr, enc))
        return row, 1
    if spec["modality"] == "video":
        own = videos is None
        videos = videos or _OpenVideos()
        try:
            arr = videos.get(spec["uri"], tuple(spec["size"])).clip(spec["frame_indices"])
        finally:
            if own:
                videos.close()
        row.update(frames=arr.shape[0], height=arr.shape[1], width=arr.shape[2], channels=3, pixel_encoding=enc,
                   pixels=encode_pixels(arr, enc))
        return row, int(arr.shape[0])
    if spec["modality"] == "3d":
        raw = read_3dgs(storage.read_bytes(spec["uri"], cfg.resources.max_bytes_per_file), cfg.threed.gaussian_policy())
        mv = render_multiview(activate_normalised(raw), cfg.threed)
        rgba = mv["rgba"]
        row.update(frames=rgba.shape[0], height=rgba.shape[1], width=rgba.shape[2], channels=4,
                   pixel_encoding="raw" if enc == "jpeg" else enc, pixels=encode_pixels(rgba, "raw" if enc == "jpeg" else enc),
                   depth=mv["depth"].tobytes(), viewmats=mv["viewmats"].reshape(-1).tolist(),
                   intrinsics=mv["Ks"].reshape(-1).tolist(), voxels=np.ascontiguousarray(mv["voxels"]).tobytes(),
                   grid=cfg.threed.grid, num_gaussians=int(len(raw["xyz"])))
        return row, int(rgba.shape[0])
    raise ValueError(f"unknown modality {spec['modality']!r}")


def process_partition(part: dict, cfg: IngestConfig, chunk_rows: int = 16) -> dict:
    """Runs in a Ray task / actor. Returns a small summary; pixels never go through the object store.
    Rows stream to the shard writer in chunks, so a partition's memory is a few chunks, not the shard."""
    t0 = time.time()
    rows, rejects, frames, sample_ids, splits = [], [], 0, [], {}
    stage = {"image": "decode", "video": "decode", "3d": "render"}[part["modality"]]
    out, name = cfg.output, part["name"]
    videos, writer = _OpenVideos(), ShardWriter(cfg.shard.compression)
    try:
        for spec in sorted(part["specs"], key=lambda s: (s["item_id"], s.get("clip_index", 0))):
            try:
                row, n = sample_row(spec, cfg, videos)
            except Exception as e:  # one bad sample never stops the partition
                rejects.append(reject({"uri": spec["uri"], "id": spec["item_id"], "modality": spec["modality"]},
                                      stage, e, spec["modality"]))
                continue
            rows.append(row)
            frames += n
            sample_ids.append(row["sample_id"])
            splits[row["split"]] = splits.get(row["split"], 0) + 1
            if len(rows) >= chunk_rows:
                writer.add(rows)
                rows = []
        writer.add(rows)
        side = {"name": name, "modality": part["modality"], "rows": writer.rows, "bytes": writer.nbytes,
                "splits": splits, "sample_ids": sample_ids, "rejected": len(rejects)}
        storage.commit_bytes(storage.join(out, "shards", f"{name}.json"), json.dumps(side).encode())
        write_quarantine(rejects, storage.join(out, "quarantine", f"{name}.parquet"))
    except BaseException:
        writer.abort()
        raise
    finally:
        videos.close()
    written = writer.commit(shard_uri(out, name))
    return {"name": name, "modality": part["modality"], "rows": len(sample_ids), "rejected": len(rejects), "frames": frames,
            "bytes": written, "seconds": time.time() - t0, "rejects": json.dumps(rejects)}


class RenderActor:
    """GPU actor for 3D partitions (gsplat renders on the actor's GPU)."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        out = [process_partition({"name": n, "modality": m, "specs": json.loads(s)}, self.cfg)
               for n, m, s in zip(batch["name"], batch["modality"], batch["specs"])]
        return {k: [o[k] for o in out] for k in out[0]}
