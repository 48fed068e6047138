"""Training throughput: Ray Train + DeepSpeed ZeRO-3 with 2 CPU workers vs a plain single-process
PyTorch loop (2 threads) of the same model, losses and global batch, in the same run.

    python benchmarks/train.py [--steps 20] [--preset tiny|base] [--budget 512]

Prints tokens/s of both (the distributed figure excludes the first report window: start-up and warm-up),
their ratio (target >= 0.7) and the distributed run's data-wait fraction (target <= 5%).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

OVERRIDES = ["image.max_side=128", "video.max_side=64", "threed.views=4", "threed.resolution=64", "threed.grid=8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=int, default=512, help="tokens per worker per step")
    ap.add_argument("--preset", default="tiny", help="model preset (tiny: 1.2M parameters, base: 190M)")
    args = ap.parse_args()
    import ray

    from orchestration.hydra_config import load
    from pipelines.ingest import run_ingest
    from pipelines.reader import iter_rows
    from preprocess.sample_corpus import CorpusConfig, build_corpus
    from trainers.config import StageConfig
    from trainers.data import row_to_sample
    from trainers.stage import run_stage

    d = Path(tempfile.mkdtemp())
    manifest = build_corpus(d / "corpus", CorpusConfig(digits_per_class=5, gaussians_per_asset=500))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    run_ingest(load("ingest", [f"input={manifest}", f"output={d / 'shards'}", *OVERRIDES]))

    cfg = StageConfig(steps=args.steps)
    cfg.model.preset = args.preset
    cfg.data.shards, cfg.data.ratios = str(d / "shards"), {"image_rec": 1.0}
    cfg.data.token_budget = cfg.data.max_tokens_per_sample = args.budget
    cfg.losses.feature_network = "none"  # compare the model + optimizer step, not the frozen feature net
    cfg.run.storage, cfg.run.name = str(d / "runs"), "bench"
    cfg.run.checkpoint_every, cfg.run.report_every = args.steps, max(2, args.steps // 4)
    cfg.scaling.cpus_per_worker = 0.9
    run_stage(cfg)
    hist = [json.loads(x) for x in (d / "runs" / "bench" / "metrics.jsonl").read_text().splitlines()]
    steady = hist[1:] or hist
    dist_tps = sum(h["tokens_per_s"] for h in steady) / len(steady)
    wait = sum(h["data_wait_fraction"] for h in steady) / len(steady)
    ray.shutdown()

    # baseline: one process, 2 threads, the same model, loss, optimizer and global batch (2 x budget)
    from atoken.config import preset
    from atoken.losses import l1_loss
    from atoken.model import AToken
    from atoken.packing import first_fit_decreasing
    from atoken.patchify import pack

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AToken(preset(args.preset, latent_channels=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    samples = [row_to_sample(r, args.budget) for r in iter_rows(str(d / "shards"), modality="image", split="train")]
    bins = first_fit_decreasing([s.tokens for s in samples], 2 * args.budget)
    batches = [pack([(samples[i].modality, samples[i].data) for i in b]) for b in bins]
    tokens, t0 = 0, None
    for step in range(args.steps):
        b = batches[step % len(batches)]
        if step == 2:
            t0, tokens = time.perf_counter(), 0
        out = model(b, sample=True)
        loss = 0.2 * l1_loss(out["rec"][:, :768], b.feats[:, :768]) + 1e-8 * out["posterior"].kl()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += len(b.feats)
    base_tps = tokens / (time.perf_counter() - t0)
    print(json.dumps({"preset": args.preset, "steps": args.steps, "budget_per_worker": args.budget,
                      "ray_deepspeed_zero3_2_workers_tokens_per_s": round(dist_tps, 1),
                      "single_process_2_threads_tokens_per_s": round(base_tps, 1),
                      "ratio": round(dist_tps / base_tps, 3), "data_wait_fraction": round(wait, 4)}, indent=1))


if __name__ == "__main__":
    main()
