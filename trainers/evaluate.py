"""Evaluation of an exported model on the eval split, every number beside a baseline measured the same way.

Reconstruction, per modality and dataset (photos and digits are reported apart):
  images  PSNR / SSIM / feature Fréchet distance of the model, of the PCA codec with the model's latent
          size over the same 16x16 patches (fitted on the whole training split), of that PCA through the
          model's quantiser at the same bits once the model is discrete (stage 4), and of each image's
          mean colour;
  videos  the same against PCA over 4x16x16 space-time patches fitted on the training clips;
  3D      the Gaussian decoder's render of a held-out view against the background-only render.
Understanding: zero-shot accuracy on labelled images, linear probe, text <-> visual retrieval R@1.
Pictures: original | model | PCA, per dataset (`images_<dataset>.png`, `video_frames.png`, `3d_views.png`).
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from atoken.bottleneck import FSQ
from atoken.metrics import frechet_distance, linear_probe_accuracy, psnr, retrieval_recall, ssim, zero_shot_accuracy
from atoken.patchify import image_to_tokens, tokens_to_video, video_to_tokens, voxel_features_from_views
from atoken.pca_floor import TokenPCA
from pipelines.reader import iter_rows
from preprocess.schema import decode_3d, decode_pixels
from trainers.data import row_to_sample
from trainers.export import load_export


@dataclass
class EvalConfig:
    max_items: int = 64  # eval items per (modality, dataset)
    baseline_items: int = 2000  # training items per modality (image: per dataset) the PCA floors are fitted on
    # training items per labelled dataset the linear probes are fitted on (round-robin over the labels): at
    # 1,000 of 4,000 digits the probes take 6 s of an evaluation, at 2,000 14 s (stage 4 of the main job:
    # model 0.84 / 0.86, random encoder 0.78 / 0.82, pixels 0.87 / 0.89)
    probe_items: int = 1000
    max_tokens: int = 1024  # per sample, as in training
    feature_network: str = "mobilenet_v2"  # Fréchet distance features: mobilenet_v2 | siglip2 | none
    feature_network_path: str = ""
    feature_resolution: int = 224  # Fréchet distance features at this size (the paper's rFID convention: 224)
    pictures: int = 8  # rows per picture grid

    def validate(self) -> "EvalConfig":
        from trainers.config import ConfigError

        for k in ("max_items", "baseline_items", "probe_items", "max_tokens", "pictures"):
            if getattr(self, k) < 1:
                raise ConfigError(k, "must be >= 1")
        if self.feature_network not in ("mobilenet_v2", "siglip2", "none"):
            raise ConfigError("feature_network", f"{self.feature_network!r}: choose mobilenet_v2, siglip2 or none")
        return self


def _grid(rows: list[list[np.ndarray]], path: str, cell: int = 128) -> None:
    """Rows of pictures side by side (original | model | PCA), each resized to `cell` high."""
    out = []
    for row in rows:
        ims = [Image.fromarray(x).resize((max(1, round(x.shape[1] * cell / x.shape[0])), cell), Image.NEAREST) for x in row]
        out.append(np.concatenate([np.asarray(i) for i in ims], 1))
    width = max(r.shape[1] for r in out)
    canvas = np.zeros((cell * len(out), width, 3), np.uint8)
    for i, r in enumerate(out):
        canvas[i * cell:(i + 1) * cell, : r.shape[1]] = r
    Image.fromarray(canvas).save(path)


def _u8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _to01(x: torch.Tensor) -> torch.Tensor:
    """[..., H, W, 3] in [-1, 1] -> [N, 3, H, W] in [0, 1]."""
    x = ((x.clamp(-1, 1) + 1) / 2).float()
    return (x[None] if x.ndim == 3 else x).permute(0, 3, 1, 2)


def _fsq_quantizer(model):
    fsq = FSQ(model.config.fsq_levels, model.config.fsq_num_codebooks)
    return lambda z: fsq(z)[0]


class _Scores:
    """Per-sample PSNR / SSIM of one reconstruction method."""

    def __init__(self):
        self.psnr, self.ssim = [], []

    def add(self, rec: torch.Tensor, orig: torch.Tensor) -> None:
        a, b = _to01(orig), _to01(rec)
        self.psnr.append(float(psnr(b, a).mean()))
        self.ssim.append(float(ssim(b, a).mean()))

    def into(self, res: dict, prefix: str) -> None:
        if self.psnr:
            res[f"{prefix}psnr"], res[f"{prefix}ssim"] = float(np.mean(self.psnr)), float(np.mean(self.ssim))


def _rows_by(rows: Iterable[dict], limit: int, key: str = "dataset") -> dict[str, list[dict]]:
    """Up to `limit` rows per value of `key` ("all" where it has none), in stored order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        group = out.setdefault(r.get(key) or "all", [])
        if len(group) < limit:  # bounded memory on a large shard set
            group.append(r)
    return out


def round_robin(rows: Iterable[dict], limit: int, key: str = "label") -> list[dict]:
    """Up to `limit` rows taken round-robin over the values of `key` (each group in its stored order).
    Shards are often sorted by label or dataset (the sample corpus's are), and a plain head of the list
    held a few groups only: at 500 digits per class, a probe on the first 2,000 of 4,000 training digits
    saw 5 of the 10 classes, and the image PCA floor's first 2,000 training images held no photo."""
    groups = _rows_by(rows, limit, key)
    queues = [groups[k] for k in sorted(groups, key=str)]
    out: list[dict] = []
    for i in range(max((len(q) for q in queues), default=0)):
        out.extend(q[i] for q in queues if i < len(q))
    return out[:limit]


@torch.no_grad()
def evaluate(export: str, shards: str, out_dir: str, cfg: EvalConfig = EvalConfig()) -> dict:
    model, proj, tower_cfg = load_export(export)
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    res: dict = {"export": export, "latent_channels": model.config.latent_channels,
                 "discrete": int(model.quantizer is not None)}  # a number: it is logged and gated on like the metrics
    k, quantize = model.config.latent_channels, (_fsq_quantizer(model) if model.quantizer is not None else None)
    eval_rows = list(iter_rows(shards, split="eval"))
    net = None
    if cfg.feature_network != "none":
        from atoken.features import FeatureNetwork

        net = FeatureNetwork(cfg.feature_network, cfg.feature_network_path or None, cfg.feature_resolution)

    # ------------------------------------------------------------------ images
    # each dataset's floor is PCA fitted on that dataset's training images (on every dataset's where it has
    # fewer tokens than the latent has channels): one PCA over every image let the larger dataset decide
    # it, and 4,000 digits beside 12 photos took the photos' floor from 19.98 to 17.94 dB
    train_by_ds = _rows_by(iter_rows(shards, modality="image", split="train"), cfg.baseline_items)
    images = _rows_by([r for r in eval_rows if r["modality"] == "image"], cfg.max_items)
    if images and train_by_ds:
        fp = model.config.in_channels // model.config.patch_size[0]

        def tokens(rows: list[dict]) -> torch.Tensor:
            return torch.cat([image_to_tokens(row_to_sample(r, cfg.max_tokens).data)[0][:, :fp] for r in rows])

        pooled = round_robin((r for g in train_by_ds.values() for r in g), cfg.baseline_items, "dataset")
        for ds, rows in images.items():
            fit_rows = train_by_ds.get(ds, [])
            train_tok = tokens(fit_rows) if fit_rows else torch.zeros(0, fp)
            if len(train_tok) < k:
                fit_rows, train_tok = pooled, tokens(pooled)
            pca = TokenPCA(k).fit(train_tok)
            pca_q = copy.deepcopy(pca).with_quantizer(quantize, train_tok) if quantize is not None else None
            res[f"image/{ds}/baseline_train_items"] = len(fit_rows)
            scores = {m: _Scores() for m in ("model", "pca", "pca_fsq", "mean_colour")}
            feats = {m: [] for m in ("orig", "model", "pca", "pca_fsq")}
            pictures = []
            for r in rows:
                x = row_to_sample(r, cfg.max_tokens).data
                lat, batch = model.encode([("image", x)], codes=quantize is not None)
                rec = model.decode(lat, batch)[0][0]
                tok, coords, shape = image_to_tokens(x)
                full = lambda p: torch.cat([p, tok[:, fp:]], 1)  # noqa: E731  (padding frames back for un-patchify)
                rec_pca = tokens_to_video(full(pca.reconstruct(tok[:, :fp])), coords, shape, model.config.patch_size)[0]
                scores["model"].add(rec, x)
                scores["pca"].add(rec_pca, x)
                shown = rec_pca  # the pictures' third column: the baseline the gate compares with
                if pca_q is not None:
                    shown = tokens_to_video(full(pca_q.reconstruct(tok[:, :fp])), coords, shape, model.config.patch_size)[0]
                    scores["pca_fsq"].add(shown, x)
                scores["mean_colour"].add(x.mean((0, 1), keepdim=True).expand_as(x), x)
                if net is not None:
                    for m, im in (("orig", x), ("model", rec), ("pca", rec_pca)) + ((("pca_fsq", shown),) if pca_q else ()):
                        feats[m].append(net(_to01(im))[1][0].numpy())
                if len(pictures) < cfg.pictures:
                    pictures.append([_u8(x), _u8(rec), _u8(shown)])
            pre = f"image/{ds}/"
            res[pre + "count"] = len(rows)
            scores["model"].into(res, pre)
            for m in ("pca", "pca_fsq", "mean_colour"):
                scores[m].into(res, f"{pre}{m}_")
            if net is not None and len(rows) >= 2:
                res[pre + "fd"] = frechet_distance(np.stack(feats["orig"]), np.stack(feats["model"]))
                res[pre + "pca_fd"] = frechet_distance(np.stack(feats["orig"]), np.stack(feats["pca"]))
                if pca_q is not None:
                    res[pre + "pca_fsq_fd"] = frechet_distance(np.stack(feats["orig"]), np.stack(feats["pca_fsq"]))
            _grid(pictures, os.path.join(out_dir, f"images_{ds}.png"))

    # ------------------------------------------------------------------ videos
    vids = [r for r in eval_rows if r["modality"] == "video"][: cfg.max_items]
    train_vids = [row_to_sample(r, cfg.max_tokens).data for i, r in
                  enumerate(iter_rows(shards, modality="video", split="train")) if i < cfg.baseline_items]
    if vids and train_vids:
        train_tok = torch.cat([video_to_tokens(v)[0] for v in train_vids])
        pca = TokenPCA(min(k, len(train_tok))).fit(train_tok)
        pca_q = copy.deepcopy(pca).with_quantizer(quantize, train_tok) if quantize else None
        scores = {m: _Scores() for m in ("model", "pca", "pca_fsq", "mean_colour")}
        strip = []
        for r in vids:
            x = row_to_sample(r, cfg.max_tokens).data
            lat, batch = model.encode([("video", x)], codes=quantize is not None)
            rec = model.decode(lat, batch)[0]
            tok, coords, shape = video_to_tokens(x)
            rec_pca = tokens_to_video(pca.reconstruct(tok), coords, shape, model.config.patch_size)
            scores["model"].add(rec, x)
            scores["pca"].add(rec_pca, x)
            shown = rec_pca
            if pca_q is not None:
                shown = tokens_to_video(pca_q.reconstruct(tok), coords, shape, model.config.patch_size)
                scores["pca_fsq"].add(shown, x)
            scores["mean_colour"].add(x.mean((0, 1, 2), keepdim=True).expand_as(x), x)
            if not strip:
                strip = [[_u8(x[i]), _u8(rec[i]), _u8(shown[i])] for i in range(0, x.shape[0], max(1, x.shape[0] // 4))]
        res["video/count"] = len(vids)
        scores["model"].into(res, "video/")
        for m in ("pca", "pca_fsq", "mean_colour"):
            scores[m].into(res, f"video/{m}_")
        _grid(strip, os.path.join(out_dir, "video_frames.png"))

    # ------------------------------------------------------------------ 3D
    objs = [r for r in eval_rows if r["modality"] == "3d"][: cfg.max_items]
    if objs and model.gs_decoder is not None:
        ps, ss, bg, views = [], [], [], []
        for r in objs:
            extra, px = decode_3d(r), decode_pixels(r)
            rgb = torch.from_numpy(px[..., :3].astype(np.float32) / 255.0)
            vm, K = torch.from_numpy(extra["viewmats"]), torch.from_numpy(extra["intrinsics"])
            vox = torch.from_numpy(extra["voxels"].astype(np.int64))[: cfg.max_tokens]
            feats = voxel_features_from_views(rgb[:-1], vm[:-1], K[:-1], vox, int(r["grid"]))  # last view held out
            lat, batch = model.encode([("3d", (feats, vox))], codes=quantize is not None)
            z = lat if quantize is None else model.quantizer.codes_to_latents(lat)
            rec = model.decode_sparse(z, batch.coords)
            g = model.gs_decoder(rec[:, :768], batch.coords)
            out = model.gs_decoder.render(g, vm[-1:], K[-1:], rgb.shape[2], rgb.shape[1])
            a, b = rgb[-1:].permute(0, 3, 1, 2), out.rgb.clamp(0, 1).permute(0, 3, 1, 2)
            ps.append(float(psnr(b, a)))
            ss.append(float(ssim(b, a)))
            bg.append(float(psnr(torch.zeros_like(a), a)))  # the views are rendered over black
            views.append([(a[0].permute(1, 2, 0) * 255).byte().numpy(), (b[0].permute(1, 2, 0) * 255).byte().numpy()])
        res.update({"3d/psnr": float(np.mean(ps)), "3d/ssim": float(np.mean(ss)), "3d/background_psnr": float(np.mean(bg)),
                    "3d/count": len(objs)})
        _grid(views, os.path.join(out_dir, "3d_views.png"))

    # ------------------------------------------------------------------ understanding
    if proj is not None:
        res.update(_understanding(model, proj, tower_cfg, shards, eval_rows, cfg))
    res["pictures"] = sorted(str(p) for p in Path(out_dir).glob("*.png"))
    Path(out_dir, "eval.json").write_text(json.dumps(res, indent=1))
    return res


def _semantic(model, rows: list[dict], max_tokens: int) -> torch.Tensor:
    """Semantic-head embeddings [N, C] of shard rows (one sample at a time, as a user would encode)."""
    out = []
    for r in rows:
        smp = row_to_sample(r, max_tokens)
        out.append(model.encode_sparse(model.pack([(smp.modality, smp.data)])).semantic[0])
    return torch.stack(out)


def _pixels(rows: list[dict], max_tokens: int) -> np.ndarray:
    """Raw pixels as features (the simplest baseline a probe must beat), at one size per dataset."""
    xs = [row_to_sample(r, max_tokens).data for r in rows]
    h, w = min(x.shape[0] for x in xs), min(x.shape[1] for x in xs)
    return np.stack([x[:h, :w].reshape(-1).numpy() for x in xs])


def _understanding(model, proj, tower_cfg, shards, eval_rows, cfg: EvalConfig) -> dict:
    """Per labelled dataset (>= 2 classes shared by train and eval, >= 10 eval items): zero-shot accuracy
    (class prompt = a training caption of the class) against chance, and a linear probe on the semantic
    head against the same probe on a randomly initialised encoder of the same config and on raw pixels.
    Per modality: text -> visual and visual -> text retrieval R@1 / R@5 over the eval captions, against a
    randomly initialised encoder and chance."""
    from atoken.model import AToken
    from trainers.start import cached_text_embeddings

    res: dict = {}
    torch.manual_seed(0)
    random_model = AToken(copy.deepcopy(model.config)).eval()

    train = [r for r in iter_rows(shards, modality="image", split="train") if r["label"] is not None]
    # one cache read for every text this evaluation asks for: the eval captions and the class prompts
    texts = sorted({r["caption"] or "" for r in eval_rows + train})
    table = dict(zip(texts, cached_text_embeddings(shards, tower_cfg.get("tower", "minilm"), tower_cfg.get("path") or "", texts)))

    def text_emb(captions: list[str]) -> torch.Tensor:
        return F.normalize(torch.stack([table[c] for c in captions]) @ proj.T, dim=-1)

    for ds in sorted({r.get("dataset") or "all" for r in eval_rows if r["label"] is not None and r["modality"] == "image"}):
        test = [r for r in eval_rows if r["label"] is not None and r["modality"] == "image" and (r.get("dataset") or "all") == ds]
        tr = round_robin([r for r in train if (r.get("dataset") or "all") == ds], cfg.probe_items)
        classes = sorted({r["label"] for r in tr} & {r["label"] for r in test})
        test = round_robin([r for r in test if r["label"] in classes], cfg.max_items * 4)
        if len(classes) < 2 or len(test) < 10:
            continue
        tr = [r for r in tr if r["label"] in classes]
        pre = f"und/{ds}/"
        prompt = {c: next(r["caption"] for r in tr if r["label"] == c) for c in classes}
        labels = torch.tensor([classes.index(r["label"]) for r in test])
        emb = _semantic(model, test, cfg.max_tokens)
        res[pre + "zero_shot_acc"] = zero_shot_accuracy(emb, text_emb([prompt[c] for c in classes]), labels)
        res[pre + "zero_shot_chance"] = 1.0 / len(classes)
        ytr, yte = [r["label"] for r in tr], [r["label"] for r in test]
        res[pre + "linear_probe_acc"] = linear_probe_accuracy(_semantic(model, tr, cfg.max_tokens).numpy(), ytr, emb.numpy(), yte)
        res[pre + "probe_random_encoder"] = linear_probe_accuracy(_semantic(random_model, tr, cfg.max_tokens).numpy(), ytr,
                                                                  _semantic(random_model, test, cfg.max_tokens).numpy(), yte)
        res[pre + "probe_pixels"] = linear_probe_accuracy(_pixels(tr, cfg.max_tokens), ytr, _pixels(test, cfg.max_tokens), yte)
        res[pre + "classes"], res[pre + "count"] = len(classes), len(test)
    for mod in ("image", "video", "3d"):
        # round-robin over datasets: the first 64 eval images were all digits (10 class captions)
        rows = round_robin([r for r in eval_rows if r["modality"] == mod and r["caption"]], cfg.max_items, key="dataset")
        caps = [r["caption"] for r in rows]
        texts = sorted(set(caps))
        if len(texts) < 2:
            continue
        # each distinct caption once: a text matches every item it describes (clips of one video, digits
        # of one class) and an item its one caption, so a copy of the same text is never a wrong answer
        t = text_emb(texts)
        pre = f"und/{mod}_retrieval/"
        for who, m in (("", model), ("random_encoder_", random_model)):
            v = _semantic(m, rows, cfg.max_tokens)
            for direction, (q, g, qk, gk) in (("t2v", (t, v, texts, caps)), ("v2t", (v, t, caps, texts))):
                recall = retrieval_recall(q, g, (1, 5), qk, gk)
                res[f"{pre}{who}{direction}_r1"], res[f"{pre}{who}{direction}_r5"] = recall["R@1"], recall["R@5"]
                if not who:
                    res[f"{pre}{direction}_chance_r1"] = recall["chance@1"]
        res[pre + "count"], res[pre + "captions"] = len(rows), len(texts)
    return res
