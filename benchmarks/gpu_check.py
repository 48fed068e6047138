"""Every GPU figure in one run (docs/benchmarks.md, "GPU"); on a machine without CUDA it runs what it can
and says what it skipped and why.

    python benchmarks/gpu_check.py [--steps 30] [--budget 8192] [--preset base]

Sections, each printed as one JSON line:
  environment  torch, CUDA, the device
  render       gsplat vs the CPU renderer on the same Gaussians: mean abs error of RGB and alpha, cosine of
               the gradients, views/s of both (CPU renderer on CPU, gsplat on the GPU)
  stage        one curriculum stage of the `--preset` model in bf16 through Ray Train + DeepSpeed ZeRO-3 on
               one GPU (NCCL): tokens/s, MFU, peak memory, data-wait fraction. MFU convention: model FLOPs
               per token = 6 x parameters (forward + backward of the dense layers) + 12 x layers x width x
               mean attention segment length (QK^T and AV, forward + backward), against the 989 TFLOPS
               dense bf16 peak of an H100 / H200 SXM
  ingest       the sample corpus's 3D assets rendered by GPU render actors: views/s
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_FLOPS = 989e12


def emit(section: str, **fields) -> None:
    print(json.dumps({"section": section, **fields}), flush=True)


def skip(section: str, why: str) -> None:
    emit(section, skipped=True, why=why)


def render_check() -> None:
    from atoken.cameras import sphere_cameras
    from atoken.render import render

    torch.manual_seed(0)
    n, res = 20000, 256
    means = (torch.rand(n, 3) - 0.5) * 0.8
    quats = torch.nn.functional.normalize(torch.randn(n, 4), dim=-1)
    scales, opac, colors = torch.rand(n, 3) * 0.01 + 0.003, torch.rand(n) * 0.9 + 0.05, torch.rand(n, 3)
    vm, K = sphere_cameras(4, 2.0, 40, res, res)

    def run(device, backend, repeats):
        t = [x.to(device).requires_grad_() for x in (means, scales, colors)]
        out = render(t[0], quats.to(device), t[1], opac.to(device), t[2], vm.to(device), K.to(device), res, res, backend=backend)
        out.rgb.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(repeats):
                render(t[0], quats.to(device), t[1], opac.to(device), t[2], vm.to(device), K.to(device), res, res, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, [x.grad.cpu() for x in t], len(vm) * repeats / (time.perf_counter() - start)

    cpu, cpu_grads, cpu_vps = run("cpu", "torch", 1)
    if not torch.cuda.is_available():
        skip("render", "no CUDA device: gsplat's rasterizer needs one (CPU renderer alone: "
                       f"{cpu_vps:.2f} views/s at {res}^2, {n} Gaussians)")
        return
    gpu, gpu_grads, gpu_vps = run("cuda", "gsplat", 50)
    cos = [float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) for a, b in zip(cpu_grads, gpu_grads)]
    emit("render", gaussians=n, resolution=res, rgb_mean_abs_error=float((gpu.rgb.detach().cpu() - cpu.rgb.detach()).abs().mean()),
         alpha_mean_abs_error=float((gpu.alpha.detach().cpu() - cpu.alpha.detach()).abs().mean()),
         grad_cosine={"means": cos[0], "scales": cos[1], "colors": cos[2]},
         cpu_views_per_s=round(cpu_vps, 2), gsplat_views_per_s=round(gpu_vps, 1), gsplat_over_cpu=round(gpu_vps / cpu_vps, 1))


def flops_per_token(model, mean_segment: float) -> float:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    layers = c.encoder_num_blocks + c.decoder_num_blocks
    return 6 * n_params + 12 * layers * c.encoder_model_channels * mean_segment


def stage_check(args, corpus: Path, work: Path) -> None:
    if not torch.cuda.is_available():
        skip("stage", "no CUDA device: the bf16 / NCCL stage runs on one GPU")
        return
    from atoken.config import preset
    from atoken.model import AToken
    from orchestration.hydra_config import load
    from pipelines.ingest import run_ingest
    from trainers.config import TrainConfig
    from trainers.stage import run_stage

    shards = work / "shards-stage"
    run_ingest(load("ingest", [f"input={corpus}", f"output={shards}", "image.max_side=256", "video.max_side=128"]))
    cfg = TrainConfig(steps=args.steps)
    cfg.model.preset, cfg.init.fresh = args.preset, "zero"
    cfg.data.shards, cfg.data.ratios = str(shards), {"image_rec": 1.0}
    cfg.data.token_budget = cfg.data.max_tokens_per_sample = args.budget
    cfg.losses.feature_network = "none"
    cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker = 1, True, 4
    cfg.scaling.fused_adam = False  # no FusedAdam JIT build on a bare machine (the image pre-builds it)
    cfg.run.storage, cfg.run.name = str(work / "runs"), "gpu-check"
    cfg.run.checkpoint_every, cfg.run.report_every = args.steps, max(2, args.steps // 5)
    t0 = time.time()
    res = run_stage(cfg)
    hist = [json.loads(x) for x in (work / "runs" / "gpu-check" / "metrics.jsonl").read_text().splitlines()]
    steady = hist[1:] or hist
    tps = sum(h["tokens_per_s"] for h in steady) / len(steady)
    model = AToken(preset(args.preset))
    f = flops_per_token(model, mean_segment=args.budget / 8)  # ~8 images per packed batch at 256 px
    emit("stage", preset=args.preset, steps=args.steps, tokens_per_step=args.budget, tokens_per_s=round(tps, 1),
         mfu=round(tps * f / PEAK_BF16_FLOPS, 4), flops_per_token=f,
         peak_memory_mb=max(h["peak_memory_mb"] for h in hist),
         data_wait_fraction=round(sum(h["data_wait_fraction"] for h in steady) / len(steady), 4),
         step_seconds={k[5:-2]: round(sum(h[k] for h in steady) / len(steady), 4) for k in steady[0] if k.startswith("time/")},
         wall_s=round(time.time() - t0, 1), startup_s=res.startup_s)


def ingest_check(corpus: Path, work: Path) -> None:
    import ray

    if not torch.cuda.is_available() or not ray.cluster_resources().get("GPU"):
        skip("ingest", "no GPU in the Ray cluster: 3D partitions render on CPU tasks instead of GPU actors")
        return
    from orchestration.hydra_config import load
    from pipelines.ingest import run_ingest

    views = 16
    t0 = time.time()
    summary = run_ingest(load("ingest", [f"input={corpus}", f"output={work / 'shards-3d'}", f"threed.views={views}",
                                         "threed.resolution=256", "threed.grid=64"]))
    n3d = summary["per_modality"].get("3d", {}).get("samples_written", 0)
    wall = time.time() - t0
    emit("ingest", assets=n3d, views_per_asset=views, resolution=256, wall_s=round(wall, 1),
         views_per_s_including_decode=round(n3d * views / wall, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--budget", type=int, default=8192, help="tokens per step on the GPU")
    ap.add_argument("--preset", default="base")
    args = ap.parse_args()
    import ray

    from preprocess.sample_corpus import CorpusConfig, build_corpus

    cuda = torch.cuda.is_available()
    emit("environment", torch=torch.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name(0) if cuda else "cpu")
    work = Path(tempfile.mkdtemp(prefix="atoken-gpu-check-"))
    corpus = build_corpus(work / "corpus", CorpusConfig(digits_per_class=5, gaussians_per_asset=20000))
    render_check()
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    ingest_check(corpus, work)
    stage_check(args, corpus, work)
    ray.shutdown()


if __name__ == "__main__":
    main()
