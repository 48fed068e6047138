"""Evaluation of an exported model on the eval split, as a function the workflow calls.

Reconstruction: image PSNR / SSIM / Fréchet distance (on the named feature network), video PSNR / SSIM,
3D PSNR / SSIM on a held-out view (voxel features from the other views, Gaussian decoder render).
Understanding: zero-shot accuracy on labelled images (class prompt = a train caption of that label),
linear-probe accuracy, text <-> visual retrieval R@1. Floor: PSNR of the PCA patch codec with the same
latent size, fitted on the training images. Pictures: original | reconstruction grids.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from atoken.metrics import frechet_distance, linear_probe_accuracy, psnr, retrieval_recall, ssim, zero_shot_accuracy
from atoken.model import AToken
from atoken.patchify import voxel_features_from_views
from atoken.pca_floor import PatchPCA
from pipelines.reader import iter_rows
from preprocess import storage
from preprocess.schema import decode_3d, decode_pixels
from trainers.data import row_to_sample
from trainers.loop import EXPORT_EXTRA


def _load_export(export: str) -> tuple[AToken, torch.Tensor | None, dict]:
    d = Path(tempfile.mkdtemp(prefix="atoken-eval-"))
    for f in ("config.json", "model.safetensors", EXPORT_EXTRA, "text_tower.json"):
        uri = storage.join(export, f)
        if storage.exists(uri):
            with storage.local_path(uri) as p:
                (d / f).write_bytes(Path(p).read_bytes())
    model = AToken.from_pretrained(d).eval()
    proj = None
    if (d / EXPORT_EXTRA).exists():
        from safetensors.torch import load_file

        proj = load_file(str(d / EXPORT_EXTRA))["weight"]
    tower = json.loads((d / "text_tower.json").read_text()) if (d / "text_tower.json").exists() else {"tower": "minilm", "path": ""}
    return model, proj, tower


def _grid(pairs: list[tuple[np.ndarray, np.ndarray]], path: str, cell: int = 128) -> None:
    """Rows of original | reconstruction, each resized to `cell` high."""
    rows = []
    for a, b in pairs:
        ims = [Image.fromarray(x).resize((max(1, round(x.shape[1] * cell / x.shape[0])), cell)) for x in (a, b)]
        row = np.concatenate([np.asarray(i) for i in ims], 1)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    canvas = np.zeros((cell * len(rows), width, 3), np.uint8)
    for i, r in enumerate(rows):
        canvas[i * cell:(i + 1) * cell, : r.shape[1]] = r
    Image.fromarray(canvas).save(path)


def _u8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


@torch.no_grad()
def evaluate(export: str, shards: str, out_dir: str, feature_network: str = "mobilenet_v2",
             feature_network_path: str = "", max_items: int = 64, max_tokens: int = 1024) -> dict:
    from atoken.features import FeatureNetwork
    from atoken.text import text_tower

    model, proj, tower_cfg = _load_export(export)
    os.makedirs(out_dir, exist_ok=True)
    res: dict = {"export": export}
    eval_rows = list(iter_rows(shards, split="eval"))[: max_items * 3]
    train_images = [r for r in iter_rows(shards, modality="image", split="train")][: max_items]

    # images: reconstruction + the PCA floor with the same latent size per 16x16 patch
    imgs = [r for r in eval_rows if r["modality"] == "image"][:max_items]
    if imgs:
        net = FeatureNetwork(feature_network, feature_network_path or None, 224) if feature_network != "none" else None
        ps, ss, fo, fr, pairs = [], [], [], [], []
        for r in imgs:
            s = row_to_sample(r, max_tokens)
            lat, batch = model.encode([("image", s.data)])
            rec = model.decode(lat, batch)[0][0]
            a = ((s.data + 1) / 2).permute(2, 0, 1)[None]
            b = ((rec.clamp(-1, 1) + 1) / 2).permute(2, 0, 1)[None]
            ps.append(float(psnr(b, a)))
            ss.append(float(ssim(b, a)))
            if net is not None:
                fo.append(net(a)[1][0].numpy())
                fr.append(net(b)[1][0].numpy())
            if len(pairs) < 8:
                pairs.append((_u8(s.data), _u8(rec)))
        res.update(image_psnr=float(np.mean(ps)), image_ssim=float(np.mean(ss)), image_count=len(imgs))
        if net is not None and len(fo) >= 2:
            res.update(image_fd=frechet_distance(np.stack(fo), np.stack(fr)), fd_feature_network=f"{net.name}@224")
        pca = PatchPCA(model.config.latent_channels).fit([decode_pixels(r)[0] / 255.0 for r in train_images])
        res["pca_floor_psnr"] = float(np.mean([pca.psnr(row_to_sample(r, max_tokens).data.add(1).div(2).numpy())
                                               for r in imgs]))
        res["pca_floor_components"] = model.config.latent_channels
        _grid(pairs, os.path.join(out_dir, "images.png"))

    vids = [r for r in eval_rows if r["modality"] == "video"][: max(1, max_items // 8)]
    if vids:
        ps, ss, strip = [], [], None
        for r in vids:
            s = row_to_sample(r, max_tokens)
            lat, batch = model.encode([("video", s.data)])
            rec = model.decode(lat, batch)[0]
            a, b = ((s.data + 1) / 2).permute(0, 3, 1, 2), ((rec.clamp(-1, 1) + 1) / 2).permute(0, 3, 1, 2)
            ps.append(float(psnr(b, a).mean()))
            ss.append(float(ssim(b, a).mean()))
            if strip is None:
                strip = [(_u8(s.data[i]), _u8(rec[i])) for i in range(0, s.data.shape[0], max(1, s.data.shape[0] // 4))]
        res.update(video_psnr=float(np.mean(ps)), video_ssim=float(np.mean(ss)), video_count=len(vids))
        _grid(strip, os.path.join(out_dir, "video_frames.png"))

    objs = [r for r in eval_rows if r["modality"] == "3d"][:4]
    if objs and model.gs_decoder is not None:
        ps, ss, views = [], [], []
        for r in objs:
            extra = decode_3d(r)
            px = decode_pixels(r)
            rgb = torch.from_numpy(px[..., :3].astype(np.float32) / 255.0)
            vm, K = torch.from_numpy(extra["viewmats"]), torch.from_numpy(extra["intrinsics"])
            vox = torch.from_numpy(extra["voxels"].astype(np.int64))[:max_tokens]
            feats = voxel_features_from_views(rgb[:-1], vm[:-1], K[:-1], vox, int(r["grid"]))  # last view held out
            lat, batch = model.encode([("3d", (feats, vox))])
            rec = model.decode_sparse(lat, batch.coords)
            g = model.gs_decoder(rec[:, :768], batch.coords)
            out = model.gs_decoder.render(g, vm[-1:], K[-1:], rgb.shape[2], rgb.shape[1])
            a, b = rgb[-1:].permute(0, 3, 1, 2), out.rgb.clamp(0, 1).permute(0, 3, 1, 2)
            ps.append(float(psnr(b, a)))
            ss.append(float(ssim(b, a)))
            views.append(((a[0].permute(1, 2, 0) * 255).byte().numpy(), (b[0].permute(1, 2, 0) * 255).byte().numpy()))
        res.update(**{"3d_psnr": float(np.mean(ps)), "3d_ssim": float(np.mean(ss)), "3d_count": len(objs)})
        _grid(views, os.path.join(out_dir, "3d_views.png"))

    # understanding
    if proj is not None:
        tower = text_tower(tower_cfg.get("tower", "minilm"), tower_cfg.get("path") or None)

        def text_emb(texts: list[str]) -> torch.Tensor:
            return F.normalize(tower.encode(texts) @ proj.T, dim=-1)

        def visual_emb(rows: list[dict]) -> torch.Tensor:
            out = []
            for r in rows:
                s = row_to_sample(r, max_tokens)
                out.append(model.encode_sparse(model.pack([(s.modality, s.data)])).semantic[0])
            return torch.stack(out)

        labelled = [r for r in eval_rows if r["label"] is not None and r["modality"] == "image"]
        train_lab = [r for r in train_images if r["label"] is not None]
        classes = sorted({r["label"] for r in train_lab} & {r["label"] for r in labelled})
        if len(classes) >= 2:
            prompt = {c: next(r["caption"] for r in train_lab if r["label"] == c) for c in classes}
            test = [r for r in labelled if r["label"] in prompt]
            emb = visual_emb(test)
            labels = torch.tensor([classes.index(r["label"]) for r in test])
            res["zero_shot_acc"] = zero_shot_accuracy(emb, text_emb([prompt[c] for c in classes]), labels)
            tr = [r for r in train_lab if r["label"] in prompt]
            if len({r["label"] for r in tr}) >= 2:
                res["linear_probe_acc"] = linear_probe_accuracy(
                    visual_emb(tr).numpy(), [r["label"] for r in tr], emb.numpy(), [r["label"] for r in test])
            res["understanding_classes"] = len(classes)
        captioned = [r for r in eval_rows if r["caption"]][:max_items]
        if len(captioned) >= 2:
            v, t = visual_emb(captioned), text_emb([r["caption"] for r in captioned])
            res["retrieval_t2v_r1"] = retrieval_recall(t, v, (1,))["R@1"]
            res["retrieval_v2t_r1"] = retrieval_recall(v, t, (1,))["R@1"]
            res["retrieval_items"] = len(captioned)
    res["pictures"] = sorted(str(p) for p in Path(out_dir).glob("*.png"))
    Path(out_dir, "eval.json").write_text(json.dumps(res, indent=1))
    return res
