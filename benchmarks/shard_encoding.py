"""Frame payload encoding for shards: bytes per sample and read throughput (decode to uint8 arrays) for
raw uint8 with Arrow IPC zstd / lz4 buffer compression vs per-frame PNG / JPEG, on real sample-corpus
video clips and photos, in the same run.

    python benchmarks/shard_encoding.py
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa


def samples() -> list[dict]:
    from pipelines.config import IngestConfig
    from pipelines.process import sample_row
    from pipelines.manifest import load_items
    from pipelines.specs import expand_item
    from preprocess.sample_corpus import CorpusConfig, build_corpus
    import dataclasses

    d = Path(tempfile.mkdtemp())
    manifest = build_corpus(d, CorpusConfig(digits_per_class=1, gaussians_per_asset=500))
    cfg = IngestConfig(input=str(manifest), output="unused")
    rows = []
    for it in load_items(str(manifest)):
        if it.modality in ("image", "video") and not it.id.startswith("digit"):
            for spec in expand_item(dataclasses.asdict(it), cfg):
                rows.append(sample_row(spec, cfg)[0])
    return rows


def measure(rows: list[dict], encoding: str, compression: str | None) -> dict:
    from preprocess.schema import decode_pixels, encode_pixels, to_table

    enc_rows = []
    t = time.perf_counter()
    for r in rows:
        px = decode_pixels(r)
        enc_rows.append({**r, "pixel_encoding": encoding, "pixels": encode_pixels(px, encoding)})
    encode_s = time.perf_counter() - t
    table = to_table(enc_rows)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema,
                                                            options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
            w.write_table(table, max_chunksize=64)
        size = os.path.getsize(path)
        frames = sum(r["frames"] for r in rows)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            with pa.memory_map(path) as src:
                back = pa.ipc.open_file(src).read_all().to_pylist()
            for r in back:
                decode_pixels(r)
            best = min(best, time.perf_counter() - t)
    raw = sum(r["frames"] * r["height"] * r["width"] * 3 for r in rows)
    return {"encoding": encoding, "compression": compression or "none", "bytes_per_sample": round(size / len(rows)),
            "ratio_vs_raw": round(raw / size, 2), "read_frames_per_s": round(frames / best, 1),
            "encode_frames_per_s": round(frames / encode_s, 1), "lossless": encoding != "jpeg"}


def main() -> None:
    rows = samples()
    results = [measure(rows, "raw", "zstd"), measure(rows, "raw", "lz4"), measure(rows, "raw", None),
               measure(rows, "png", None), measure(rows, "jpeg", None)]
    print(json.dumps({"samples": len(rows), "frames": sum(r["frames"] for r in rows), "results": results}, indent=1))


if __name__ == "__main__":
    main()
