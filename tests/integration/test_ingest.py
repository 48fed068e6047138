"""Ingestion against real Ray, real files (decord, PyAV, CPU renderer) and a real S3 endpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from preprocess.sample_corpus import read_manifest
from preprocess.schema import SCHEMA, decode_3d, decode_pixels
from tests.conftest import SMALL_INGEST

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _cfg(inp: str, out: str, extra: list[str] = ()):
    from orchestration.hydra_config import load

    return load("ingest", [f"input={inp}", f"output={out}", *SMALL_INGEST, *extra])


def _expected_samples(cfg) -> set[str]:
    from pipelines.manifest import load_items
    from pipelines.specs import expand_item

    ids = set()
    for it in load_items(cfg.input):
        for r in expand_item(dataclasses.asdict(it), cfg):
            if r["kind"] == "spec":
                ids.add(r["sample_id"])
    return ids


@pytest.fixture(scope="module")
def ingested(ray_cluster, small_corpus, tmp_path_factory):
    from pipelines.ingest import run_ingest

    out = tmp_path_factory.mktemp("shards")
    cfg = _cfg(str(small_corpus), str(out))
    summary = run_ingest(cfg)
    return cfg, out, summary


def test_round_trip_covers_every_field_of_every_modality(ingested, small_corpus):
    from pipelines.reader import iter_rows, read_shards

    cfg, out, summary = ingested
    manifest = {r["id"]: r for r in read_manifest(small_corpus)}
    rows = list(iter_rows(str(out)))
    assert {r["sample_id"] for r in rows} == _expected_samples(cfg)
    assert summary["rejected"] == 0 and summary["samples_written"] == len(rows)
    assert set(rows[0]) == set(SCHEMA.names)
    seen = Counter()
    for r in rows:
        m = manifest[r["item_id"]]
        seen[r["modality"]] += 1
        assert (r["modality"], r["caption"], r["label"], r["split"], r["dataset"]) == (
            m["modality"], m["caption"], m["label"], m["split"], m["dataset"])
        px = decode_pixels(r)
        assert px.shape == (r["frames"], r["height"], r["width"], r["channels"]) and px.dtype == np.uint8
        assert r["height"] % 16 == 0 and r["width"] % 16 == 0 and max(r["height"], r["width"]) <= 128
        if r["modality"] == "image":
            assert r["frames"] == 1 and px.std() > 0
        elif r["modality"] == "video":
            assert r["frames"] == 8 and len(r["frame_indices"]) == 8 and r["fps"] > 0
            assert np.all(np.diff(r["frame_indices"]) == 2) and r["sample_id"] == f"{r['item_id']}#c{r['clip_index']}"
            assert np.abs(px[0].astype(int) - px[-1]).mean() > 1  # real motion between first and last frame
        else:
            extra = decode_3d(r)
            assert r["channels"] == 4 and r["frames"] == 4 and r["grid"] == 16 and r["num_gaussians"] == 600
            assert extra["depth"].shape == (4, 64, 64) and extra["viewmats"].shape == (4, 4, 4)
            assert len(extra["voxels"]) > 10 and extra["voxels"].min() >= 0 and extra["voxels"].max() < 16
            alpha = px[..., 3] > 127
            assert alpha.any() and (extra["depth"][alpha] > 0).all()
    assert seen["image"] == 35 and seen["3d"] == 4 and seen["video"] >= 8
    ds = read_shards(str(out), modality="video")
    assert ds.count() == seen["video"]
    assert read_shards(str(out), split="eval").count() == sum(1 for r in rows if r["split"] == "eval")
    photos = sum(1 for r in rows if r["dataset"] == "photos" and r["split"] == "train")
    # a dataset filter and a repeated listing (a pass that spans a stage) read the same rows that many times
    assert read_shards(str(out), modality="image", split="train", dataset="photos", repeat=7).count() == 7 * photos
    index = json.loads((out / "index.json").read_text())
    assert index["rows"] == len(rows) and all(s["bytes"] > 0 for s in index["shards"])
    assert index["schema_version"] == 2 and index["code_version"]
    summary_file = json.loads((out / "summary.json").read_text())
    assert summary_file["per_modality"]["video"]["items_in"] == 8 and summary_file["frames_per_s"] > 0


def _make_bad_inputs(src: Path, d: Path) -> list[dict]:
    """Bad files made from real corpus files, each with what its quarantine reason must say."""
    d.mkdir()
    photo = (src / "images" / "chelsea.png").read_bytes()
    video = (src / "videos" / "carphone.mp4").read_bytes()
    ply = (src / "3d" / "chameleon.ply").read_bytes()
    header_end = ply.index(b"end_header\n") + len(b"end_header\n")
    bad = {
        "zero.png": (b"", "image", "empty file"),
        "truncated.png": (photo[: len(photo) // 3], "image", "truncated"),
        "lying.png": (video, "image", "content is video data"),
        "corrupt_middle.png": (photo[: len(photo) // 2] + bytes(3000) + photo[len(photo) // 2 + 3000:], "image", "corrupt"),
        "bomb.png": (_bomb_png(), "image", "max_pixels"),
        "zero.mp4": (b"", "video", "empty file"),
        "truncated.mp4": (video[:5000], "video", "cannot open video"),
        "lying.mp4": (photo, "video", "content is image data"),
        "nan.ply": (ply[:header_end] + np.array([np.nan] * 3, "<f4").tobytes() + ply[header_end + 12:], "3d", "NaN/Inf"),
        "truncated.ply": (ply[: len(ply) // 2], "3d", "truncated"),
        "huge.ply": (ply.replace(b"element vertex 600", b"element vertex 900000000", 1), "3d", "max_gaussians"),
        "missing.ply": (ply.replace(b"property float opacity", b"property float opacitz", 1), "3d", "missing required"),
    }
    rows = []
    for name, (data, modality, reason) in bad.items():
        (d / name).write_bytes(data)
        rows.append({"id": f"bad-{name}", "uri": str(d / name), "modality": modality, "caption": "bad", "reason": reason})
    return rows


def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)  # declares 10^10 pixels
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def test_bad_inputs_are_quarantined_with_reasons_and_good_ones_written(ray_cluster, small_corpus, tmp_path):
    from pipelines.ingest import run_ingest
    from pipelines.reader import iter_rows
    from pipelines.shards import read_quarantine

    src = small_corpus.parent
    bad = _make_bad_inputs(src, tmp_path / "bad")
    good = [r for r in read_manifest(small_corpus) if r["id"] in ("chelsea", "carphone", "chameleon", "coffee")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({**r, "uri": str(src / r["uri"]) if "/" not in r["uri"][:1] else r["uri"]})
                                  for r in good + bad))
    summary = run_ingest(_cfg(str(manifest), str(tmp_path / "out")))
    q = {r["item_id"]: r for r in read_quarantine(str(tmp_path / "out")).to_pylist()}
    assert set(q) == {r["id"] for r in bad}
    for r in bad:
        row = q[r["id"]]
        assert r["reason"] in row["message"], (r["id"], row)
        assert row["uri"] == r["uri"] and row["stage"] in ("open", "probe", "decode", "render") and row["error_class"]
    written = {r["item_id"] for r in iter_rows(str(tmp_path / "out"))}
    assert written == {"chelsea", "carphone", "chameleon", "coffee"}
    assert summary["rejected"] == len(bad) and summary["per_modality"]["3d"]["rejected"] == 4


def test_s3_input_and_output_round_trip(ray_cluster, s3_server, small_corpus):
    import s3fs

    from pipelines.ingest import run_ingest
    from pipelines.reader import iter_rows, read_shards

    fs = s3fs.S3FileSystem()
    b = s3_server["bucket"]
    src = small_corpus.parent
    keep = [r for r in read_manifest(small_corpus) if r["id"] in ("rocket", "digit_0001", "bikes", "bunny")]
    for r in keep:
        fs.put_file(str(src / r["uri"]), f"{b}/inputs/{r['uri']}")
    fs.pipe(f"{b}/inputs/manifest.jsonl", "\n".join(json.dumps(r) for r in keep).encode())
    summary = run_ingest(_cfg(f"s3://{b}/inputs/manifest.jsonl", f"s3://{b}/shards"))
    assert summary["rejected"] == 0
    listed = fs.ls(f"{b}/shards/shards")
    assert any(p.endswith(".arrow") for p in listed) and not any(".tmp-" in p for p in listed)
    rows = list(iter_rows(f"s3://{b}/shards"))
    assert {r["item_id"] for r in rows} == {"rocket", "digit_0001", "bikes", "bunny"}
    assert all(r["uri"].startswith(f"s3://{b}/inputs/") for r in rows)
    assert read_shards(f"s3://{b}/shards").count() == len(rows)
    env_dump = json.dumps(summary)
    assert "testing" not in env_dump  # credentials never end up in outputs


def test_killed_driver_rerun_finishes_exactly_once(small_corpus, tmp_path):
    out = tmp_path / "out"
    args = [str(Path(sys.executable).with_name("atoken")), "ingest", f"input={small_corpus}", f"output={out}",
            *SMALL_INGEST, "shard.max_rows=3"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    log = open(tmp_path / "run1.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=REPO)
    deadline = time.time() + 240
    committed = []
    while time.time() < deadline and proc.poll() is None:
        committed = sorted((out / "shards").glob("*.arrow")) if (out / "shards").exists() else []
        if len(committed) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "shards").glob("*.arrow")}
    assert 2 <= len(before)
    run2 = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert run2.returncode == 0, run2.stdout[-3000:] + run2.stderr[-3000:]
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in (out / "shards").glob("*.arrow")}
    assert all(after[n] == v for n, v in before.items())  # committed shards were not rewritten
    assert len(after) > len(before)
    from pipelines.reader import iter_rows
    from orchestration.hydra_config import load

    ids = [r["sample_id"] for r in iter_rows(str(out))]
    assert len(ids) == len(set(ids))
    cfg = load("ingest", [f"input={small_corpus}", f"output={out}", *SMALL_INGEST, "shard.max_rows=3"])
    assert set(ids) == _expected_samples(cfg)
    assert not list((out / "shards").glob("*.tmp-*"))
    assert "already committed" in run2.stdout + run2.stderr


_DECODE_CHILD = """
import json, sys
from pipelines.config import IngestConfig
from pipelines.process import sample_row
from pipelines.specs import expand_item
cfg = IngestConfig(input="x", output="y")
cfg.video.max_clips_per_video = 1
item = {"id": "v", "uri": sys.argv[1], "modality": "video", "caption": "", "label": None, "split": "train"}
spec = expand_item(item, cfg)[0]
row, n = sample_row(spec, cfg)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"frames": n, "hwm_kb": hwm}))
"""


def test_video_worker_peak_memory_does_not_grow_with_video_length(tmp_path):
    from preprocess.sample_corpus import _camera_move, _encode_h264
    from skimage import data

    img = data.astronaut()
    short = _camera_move(img, "pan_right", 48, (320, 240))
    _encode_h264(short, tmp_path / "short.mp4", 12)
    _encode_h264(short * 10, tmp_path / "long.mp4", 12)  # the same clip 10x: 10x longer
    peaks = []
    for name in ("short.mp4", "long.mp4"):
        r = subprocess.run([sys.executable, "-c", _DECODE_CHILD, str(tmp_path / name)], capture_output=True, text=True,
                           timeout=300, cwd=REPO)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert (tmp_path / "long.mp4").stat().st_size > 5 * (tmp_path / "short.mp4").stat().st_size
    assert peaks[0]["frames"] == peaks[1]["frames"] == 16
    assert peaks[1]["hwm_kb"] <= 1.2 * peaks[0]["hwm_kb"], peaks
