"""The offline sample corpus: counts, every file decodes, 3DGS layout and ranges, deterministic split."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from preprocess.sample_corpus import build_corpus, read_manifest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    manifest = build_corpus(out)
    return out, manifest, read_manifest(manifest)


def test_counts_per_modality(corpus):
    out, _, rows = corpus
    counts = Counter(r["modality"] for r in rows)
    photos = [r for r in rows if r["modality"] == "image" and not r["id"].startswith("digit_")]
    digits = [r for r in rows if r["id"].startswith("digit_")]
    assert len(photos) >= 12 and counts["video"] >= 7 and counts["3d"] >= 3
    assert Counter(r["label"] for r in digits) == {str(c): 500 for c in range(10)}  # all packaged digits
    assert sum(1 for r in rows if r["modality"] == "video" and "_" in r["id"]) >= 4  # pans/zooms
    assert all(r["caption"] for r in rows)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 100e6


def test_every_image_decodes_with_varied_sizes(corpus):
    from PIL import Image

    out, _, rows = corpus
    sizes = set()
    for r in rows:
        if r["modality"] == "image":
            with Image.open(out / r["uri"]) as im:
                im.load()
                sizes.add(im.size)
    assert len(sizes) >= 10


def test_every_video_decodes_with_decord_and_is_2_to_6_s(corpus):
    import av
    import decord

    out, _, rows = corpus
    for r in rows:
        if r["modality"] != "video":
            continue
        vr = decord.VideoReader(str(out / r["uri"]))
        seconds = len(vr) / vr.get_avg_fps()
        assert 2.0 <= seconds <= 6.0, (r["uri"], seconds)
        frame = vr[len(vr) // 2].asnumpy()
        assert frame.ndim == 3 and frame.std() > 5  # real content, not a blank frame
        with av.open(str(out / r["uri"])) as c:
            assert c.streams.video[0].codec_context.name == "h264"


def test_3dgs_assets_have_inria_layout_and_valid_values(corpus):
    from plyfile import PlyData

    out, _, rows = corpus
    assets = [r for r in rows if r["modality"] == "3d"]
    formats = set()
    for r in assets:
        ply = PlyData.read(str(out / r["uri"]))
        formats.add(ply.text)
        v = ply["vertex"].data
        names = v.dtype.names
        base = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        assert list(names[:9]) == base
        n_rest = sum(1 for n in names if n.startswith("f_rest_"))
        assert n_rest in (0, 9, 24, 45)
        assert list(names[-8:]) == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
        arr = np.stack([v[n] for n in names], 1)
        assert np.isfinite(arr).all()
        xyz = np.stack([v["x"], v["y"], v["z"]], 1)
        assert np.abs(xyz).max() <= 0.5
        q = np.stack([v[f"rot_{i}"] for i in range(4)], 1)
        np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
        opacity = 1 / (1 + np.exp(-v["opacity"]))
        assert ((opacity > 0) & (opacity < 1)).all()
        scale = np.exp(np.stack([v[f"scale_{i}"] for i in range(3)], 1))
        assert (scale > 0).all() and scale.max() < 0.1
        rgb = 0.5 + 0.28209479177387814 * np.stack([v[f"f_dc_{i}"] for i in range(3)], 1)
        assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5 and rgb.std() > 0.02  # coloured, not flat
        assert len(v) == r["extra"]["gaussians"]
    assert formats == {True, False}  # both binary and ASCII PLY are represented


def test_split_is_deterministic_and_covers_every_modality(corpus, tmp_path):
    """Byte-deterministic: a second build (another folder, other processes busy) gives the same manifest,
    whose sha256 column covers every file, videos encoded by x264 included."""
    out, manifest, rows = corpus
    again = build_corpus(tmp_path / "again")
    assert again.read_bytes() == manifest.read_bytes()
    assert all(r["dataset"] for r in rows) and {r["dataset"] for r in rows} == {
        "photos", "mnist", "clips", "camera_moves", "scans"}
    for modality in ("image", "video", "3d"):
        splits = Counter(r["split"] for r in rows if r["modality"] == modality)
        assert splits["eval"] >= 1 and splits["train"] >= 2, (modality, splits)
    digits = [r for r in rows if r["id"].startswith("digit_")]
    for c in range(10):
        assert sum(1 for r in digits if r["label"] == str(c) and r["split"] == "eval") == 100


def test_cli_builds_corpus(tmp_path):
    from orchestration.cli import main

    assert main(["samples", "build", "--out", str(tmp_path / "c"), "--digits-per-class", "5",
                 "--gaussians", "500"]) == 0
    rows = read_manifest(tmp_path / "c" / "manifest.jsonl")
    assert sum(1 for r in rows if r["id"].startswith("digit_")) == 50
    assert all(r["extra"]["gaussians"] == 500 for r in rows if r["modality"] == "3d")


def test_a_rerun_keeps_a_complete_corpus_and_rebuilds_a_damaged_one(tmp_path):
    from preprocess.sample_corpus import CorpusConfig

    cfg = CorpusConfig(digits_per_class=1, gaussians_per_asset=300)
    manifest = build_corpus(tmp_path / "c", cfg)
    video = next(p for p in (tmp_path / "c" / "videos").iterdir())
    stamp = video.stat().st_mtime_ns
    assert build_corpus(tmp_path / "c", cfg) == manifest and video.stat().st_mtime_ns == stamp  # kept, not rebuilt
    original = video.read_bytes()
    video.write_bytes(b"damaged")
    build_corpus(tmp_path / "c", cfg)
    assert video.read_bytes() == original  # a file that no longer matches its sha256 is rebuilt
    build_corpus(tmp_path / "c", CorpusConfig(digits_per_class=2, gaussians_per_asset=300))
    assert sum(1 for r in read_manifest(manifest) if r["dataset"] == "mnist") == 20  # another config rebuilds
