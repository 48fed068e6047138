"""Renderer throughput: views/s of the CPU renderer on a sample 3DGS asset; on a CUDA machine also
gsplat views/s and CPU-vs-gsplat agreement (mean abs error on [0, 1] images), in the same run.

    python benchmarks/render.py [--asset chameleon] [--views 8] [--resolution 128]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def load_asset(name: str, gaussians: int) -> dict:
    from preprocess.gaussians import activate_normalised, read_3dgs
    from preprocess.sample_corpus import CorpusConfig, build_corpus

    d = Path(tempfile.mkdtemp())
    build_corpus(d, CorpusConfig(digits_per_class=1, gaussians_per_asset=gaussians))
    g = activate_normalised(read_3dgs((d / "3d" / f"{name}.ply").read_bytes()))
    return {k: torch.as_tensor(g[k]) for k in ("means", "quats", "scales", "opacities", "colors")}


def views_per_s(g: dict, views: int, res: int, backend: str, device: str, repeats: int = 2) -> tuple[float, torch.Tensor]:
    from atoken.cameras import sphere_cameras
    from atoken.render import render

    vm, K = sphere_cameras(views, 2.0, 40, res, res)
    t = {k: v.to(device) for k, v in g.items()}
    out = render(**{"means": t["means"], "quats": t["quats"], "scales": t["scales"], "opacities": t["opacities"],
                    "colors": t["colors"]}, viewmats=vm.to(device), Ks=K.to(device), width=res, height=res, backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = render(t["means"], t["quats"], t["scales"], t["opacities"], t["colors"], vm.to(device), K.to(device), res, res,
                     backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
    return views * repeats / (time.perf_counter() - start), out.rgb.float().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--asset", default="chameleon")
    ap.add_argument("--gaussians", type=int, default=3000)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=128)
    args = ap.parse_args()
    g = load_asset(args.asset, args.gaussians)
    with torch.no_grad():
        cpu_vps, cpu_img = views_per_s(g, args.views, args.resolution, "torch", "cpu")
    result = {"asset": args.asset, "gaussians": int(len(g["means"])), "resolution": args.resolution,
              "cpu_views_per_s": round(cpu_vps, 2), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        with torch.no_grad():
            gpu_vps, gpu_img = views_per_s(g, args.views, args.resolution, "gsplat", "cuda", repeats=20)
            tcuda, tcuda_img = views_per_s(g, args.views, args.resolution, "torch", "cuda", repeats=5)
        result.update({"gsplat_views_per_s": round(gpu_vps, 1), "torch_cuda_views_per_s": round(tcuda, 1),
                       "gsplat_over_cpu": round(gpu_vps / cpu_vps, 1),
                       "cpu_vs_gsplat_mean_abs_error": float((cpu_img - gpu_img).abs().mean())})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
