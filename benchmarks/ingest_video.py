"""Video ingestion throughput against bare decord on the same clips, measured in the same run.

    python benchmarks/ingest_video.py [--videos 12] [--seconds 90] [ingest overrides, e.g. shard.compression=lz4]

Prints: bare decord frames/s (one process decoding exactly the pipeline's clip specs), pipeline frames/s
with 1 and 2 Ray CPU workers (probe + decode + encode + commit), and the ratios. Excluded, like Ray's own
start: Ray Data's once-per-job start (~3 s on 2 cores: its stats and autoscaling actors), printed apart.
Targets: pipeline(1 worker) / decord >= 0.75; pipeline(2) / pipeline(1) >= 1.6.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["video.frames_per_clip=16", "video.frame_stride=1", "video.max_clips_per_video=1000", "video.max_side=128"]

_PIPELINE = """
import json, sys, time, ray
from orchestration.hydra_config import load
from pipelines.ingest import run_ingest
ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, configure_logging=False, log_to_driver=False)
t = time.perf_counter()  # Ray Data's once-per-job start (its stats and autoscaling actors), like Ray's start
ray.data.range(2, override_num_blocks=2).map(lambda r: r, num_cpus=0.5).take_all()
warm = time.perf_counter() - t
cfg = load("ingest", [f"input={sys.argv[2]}", f"output={sys.argv[3]}"] + json.loads(sys.argv[4]))
t = time.perf_counter(); s = run_ingest(cfg); dt = time.perf_counter() - t
print("RESULT " + json.dumps({"frames": s["frames_written_this_run"], "seconds": dt, "ray_data_start_s": warm}))
"""


def make_videos(d: Path, n: int, seconds: float) -> Path:
    from skimage import data

    from preprocess.sample_corpus import _camera_move, _encode_h264

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(), data.immunohistochemistry()]
    moves = ["pan_right", "zoom_in", "pan_down", "zoom_out", "pan_left", "pan_right"]
    lines = []
    for i in range(n):
        frames = _camera_move(photos[i % len(photos)], moves[i % len(moves)], int(seconds * 24), (320, 240))
        path = d / f"v{i}.mp4"
        _encode_h264(frames, path, 24)
        lines.append(json.dumps({"id": f"v{i}", "uri": str(path), "modality": "video", "caption": "c"}))
    manifest = d / "manifest.jsonl"
    manifest.write_text("\n".join(lines))
    return manifest


def bare_decord(manifest: Path) -> dict:
    from orchestration.hydra_config import load
    from pipelines.manifest import load_items
    from pipelines.specs import expand_item
    import dataclasses

    from preprocess.video import ClipReader

    cfg = load("ingest", [f"input={manifest}", "output=/tmp/unused"] + OVERRIDES)
    specs = [s for it in load_items(str(manifest)) for s in expand_item(dataclasses.asdict(it), cfg)]
    t = time.perf_counter()
    frames, reader, key = 0, None, None
    for s in specs:  # the natural bare loop: each video opened once, its clips read in order
        if key != s["uri"]:
            reader, key = ClipReader(s["uri"], tuple(s["size"])), s["uri"]
        frames += len(reader.clip(s["frame_indices"]))
    return {"frames": frames, "seconds": time.perf_counter() - t}


def pipeline(manifest: Path, out: Path, workers: int, extra: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", _PIPELINE, str(workers), str(manifest), str(out), json.dumps(OVERRIDES + extra)],
                       capture_output=True, text=True, cwd=REPO, timeout=1800)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(r.stdout[-2000:] + r.stderr[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--videos", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("overrides", nargs="*", help="extra `atoken ingest` overrides, e.g. shard.compression=lz4")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        manifest = make_videos(d, args.videos, args.seconds)
        bare = bare_decord(manifest)
        one = pipeline(manifest, d / "out1", 1, args.overrides)
        two = pipeline(manifest, d / "out2", 2, args.overrides)
    fps = {k: v["frames"] / v["seconds"] for k, v in (("decord", bare), ("pipeline_1", one), ("pipeline_2", two))}
    print(json.dumps({"frames": bare["frames"], **{f"{k}_frames_per_s": round(v, 1) for k, v in fps.items()},
                      "ray_data_start_s": [round(one["ray_data_start_s"], 2), round(two["ray_data_start_s"], 2)],
                      "pipeline1_over_decord": round(fps["pipeline_1"] / fps["decord"], 3),
                      "pipeline2_over_pipeline1": round(fps["pipeline_2"] / fps["pipeline_1"], 3)}, indent=1))


if __name__ == "__main__":
    main()
