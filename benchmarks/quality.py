"""The learning curve of image reconstruction for a wall-time budget, beside its baselines.

    python benchmarks/quality.py [--minutes 15] [--preset tiny] [--every 60] [--side 64]

One process (CPU threads, or the GPU when there is one; `--preset base` there), the project's own recipe
(trainers.start's start model: PCA init; trainers.module's losses; augmented samples from the shards),
on the offline sample corpus's photos ingested at `--side` px. Every `--every` seconds the model is
measured on the held-out photos: PSNR, SSIM and the feature Fréchet distance (MobileNetV2 features),
beside PCA at the same latent size fitted on the training photos and each photo's mean colour, measured
the same way. Prints a JSON line per point and a final summary (docs/benchmarks.md, "Quality").
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between measurements")
    ap.add_argument("--side", type=int, default=64, help="ingest max side of the photos (the main job's: 64)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--budget", type=int, default=256, help="tokens per step")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import ray

    from atoken.features import FeatureNetwork
    from atoken.metrics import frechet_distance, psnr, ssim
    from atoken.patchify import image_to_tokens, tokens_to_video
    from atoken.pca_floor import TokenPCA
    from orchestration.hydra_config import load
    from pipelines.ingest import run_ingest
    from pipelines.reader import iter_rows
    from preprocess.sample_corpus import CorpusConfig, build_corpus
    from trainers.config import TrainConfig
    from trainers.data import lr_lambda, row_to_sample
    from trainers.engine import param_groups
    from trainers.module import TrainModule
    from trainers.start import build_start_model

    torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = Path(tempfile.mkdtemp(prefix="atoken-quality-"))
    corpus = build_corpus(d / "corpus", CorpusConfig(digits_per_class=1, gaussians_per_asset=300))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    run_ingest(load("ingest", [f"input={corpus}", f"output={d / 'shards'}", f"image.max_side={args.side}"]))
    ray.shutdown()
    shards = str(d / "shards")
    cfg = TrainConfig()
    cfg.data.shards, cfg.data.ratios = shards, {"image_rec": 1.0}
    cfg.data.token_budget = cfg.data.max_tokens_per_sample = args.budget
    cfg.data.rec_dataset_weights = {"mnist": 0.0}
    cfg.model.preset, cfg.optim.lr = args.preset, args.lr
    cfg.losses.l1, cfg.losses.mse = 0.1, 1.0
    for term in (cfg.losses.perceptual, cfg.losses.gram, cfg.losses.clip):
        term.weight = 0.0
    model, _, info = build_start_model(cfg)
    model.to(dev)
    module = TrainModule(model, 384, None, cfg)
    opt = torch.optim.AdamW(param_groups(module, cfg), lr=args.lr, betas=(0.9, 0.95))
    train = [r for r in iter_rows(shards, modality="image", split="train") if r["dataset"] == "photos"]
    held = [row_to_sample(r, 4096).data for r in iter_rows(shards, modality="image", split="eval") if r["dataset"] == "photos"]
    net = FeatureNetwork("mobilenet_v2", None, 224)
    fp = model.config.in_channels // model.config.patch_size[0]

    def to01(x):
        return ((x.clamp(-1, 1) + 1) / 2).permute(2, 0, 1)[None].float()

    def measure(recs: list[torch.Tensor]) -> dict:
        a = [to01(x) for x in held]
        b = [to01(r) for r in recs]
        fa = np.stack([net(x)[1][0].numpy() for x in a])
        fb = np.stack([net(x)[1][0].numpy() for x in b])
        return {"psnr": float(np.mean([float(psnr(y, x)) for x, y in zip(a, b)])),
                "ssim": float(np.mean([float(ssim(y, x)) for x, y in zip(a, b)])),
                "fd": frechet_distance(fa, fb)}

    tok = lambda x: image_to_tokens(x)[0][:, :fp]  # noqa: E731
    pca = TokenPCA(model.config.latent_channels).fit(torch.cat([tok(row_to_sample(r, 4096).data) for r in train]))
    pca_recs = []
    for x in held:
        t, coords, shape = image_to_tokens(x)
        full = torch.cat([pca.reconstruct(t[:, :fp]), t[:, fp:]], 1)
        pca_recs.append(tokens_to_video(full, coords, shape, model.config.patch_size)[0])
    baselines = {"pca": measure(pca_recs), "mean_colour": measure([x.mean((0, 1), keepdim=True).expand_as(x) for x in held])}
    print(json.dumps({"baselines": baselines, "latent_channels": model.config.latent_channels, "preset": args.preset,
                      "device": str(dev), "train_photos": len(train), "held_out_photos": len(held), "start": info}), flush=True)

    @torch.no_grad()
    def model_recs() -> list[torch.Tensor]:
        model.eval()
        out = []
        for x in held:
            lat, b = model.encode([("image", x.to(dev))])
            out.append(model.decode(lat, b)[0][0].cpu())
        model.train()
        return out

    rng = np.random.default_rng(0)
    sched = lr_lambda(20, 10 ** 9, 1.0)
    t0, step, next_at, curve = time.time(), 0, 0.0, []
    while True:
        wall = time.time() - t0
        if wall >= next_at or wall >= args.minutes * 60:
            point = {"step": step, "wall_s": round(wall, 1), **measure(model_recs())}
            curve.append(point)
            print(json.dumps(point), flush=True)
            next_at += args.every
            if wall >= args.minutes * 60:
                break
        for g in opt.param_groups:
            g["lr"] = g.setdefault("base_lr", g["lr"]) * sched(step)
        samples, n = [], 0
        while True:
            s = row_to_sample(train[rng.integers(len(train))], args.budget, rng=rng)
            if n + s.tokens > args.budget:
                break
            samples.append(s)
            n += s.tokens
        terms = module("image_rec", samples, None, step)
        opt.zero_grad()
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        step += 1
    best = max(curve, key=lambda p: p["psnr"])
    print(json.dumps({"summary": {"minutes": args.minutes, "final": curve[-1], "best_psnr": best, "pca": baselines["pca"],
                                  "mean_colour": baselines["mean_colour"],
                                  "psnr_over_pca": round(curve[-1]["psnr"] - baselines["pca"]["psnr"], 3),
                                  "fd_below_pca": curve[-1]["fd"] < baselines["pca"]["fd"]}}), flush=True)


if __name__ == "__main__":
    main()
