"""Packed vs padded: real-token fraction after packing, and forward+backward tokens/s of the same model
on packed batches vs padded batches of the same samples, measured in the same run.

    python benchmarks/model.py [--preset tiny] [--steps 3] [--budget 2048]

On a CUDA machine it also reports bf16 MFU of the base preset (peak from --peak-tflops, default H100/H200
dense bf16 989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from atoken.config import preset
from atoken.model import AToken
from atoken.packing import fill_fraction, first_fit_decreasing
from atoken.patchify import pack
from atoken.sparse import SparseBatch, concat


def mixed_samples(n: int, seed: int = 0) -> list[tuple[str, object]]:
    """Mixed-resolution images, videos and 3D voxel sets (random content, realistic shapes)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choices(["image", "video", "3d"], [0.5, 0.3, 0.2])[0]
        if kind == "image":
            h, w = rng.choice([64, 96, 128, 160, 256]), rng.choice([64, 96, 128, 192, 256])
            out.append(("image", torch.rand(h, w, 3) * 2 - 1))
        elif kind == "video":
            t, s = rng.choice([8, 12, 16]), rng.choice([64, 96, 128])
            out.append(("video", torch.rand(t, s, s, 3) * 2 - 1))
        else:
            n_vox = rng.randint(100, 600)
            out.append(("3d", (torch.rand(n_vox, 768), torch.randint(0, 64, (n_vox, 3)))))
    return out


def padded(batch: SparseBatch) -> SparseBatch:
    """The same samples padded to the longest one (what a dense [B, Lmax] batch computes)."""
    parts = []
    for i in range(batch.num_samples):
        f, c = batch.sample(i)
        lmax = int(max(batch.offsets[1:] - batch.offsets[:-1]))
        extra = lmax - len(f)
        if extra:
            pad_c = c[-1:].repeat(extra, 1)
            pad_c[:, 3] = c[:, 3].max() + 1 + torch.arange(extra, dtype=c.dtype)  # fresh positions
            f, c = torch.cat([f, f.new_zeros(extra, f.shape[1])]), torch.cat([c, pad_c])
        parts.append(SparseBatch(f, c, [batch.modalities[i]], [batch.shapes[i]]))
    return concat(parts)


def fwd_bwd_tokens_per_s(model: AToken, batches: list[SparseBatch], real_tokens: int, device, dtype, steps: int) -> float:
    def step(b):
        out = model(b.to(device, dtype), sample=True)
        out["rec"].float().abs().mean().backward()

    step(batches[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        for b in batches:
            step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return real_tokens * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--samples", type=int, default=400, help="samples in the packed stream")
    ap.add_argument("--timed-batches", type=int, default=4, help="batches timed for tokens/s")
    ap.add_argument("--budget", type=int, default=2048, help="tokens per packed batch")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    samples = mixed_samples(args.samples)
    single = [pack([s]) for s in samples]
    lengths = [len(b.feats) for b in single]
    bins = first_fit_decreasing(lengths, args.budget)
    frac = fill_fraction(bins, lengths, args.budget)
    timed = bins[: args.timed_batches]
    packed_batches = [concat([single[i] for i in b]) for b in timed]
    # padded baseline: a dense loader takes the same samples in arrival order, the same number per
    # batch on average, and pads each batch to its longest sample
    chosen = sorted(i for b in timed for i in b)
    per = max(1, round(len(chosen) / len(timed)))
    padded_batches = [padded(concat([single[i] for i in chosen[k:k + per]])) for k in range(0, len(chosen), per)]
    real = sum(lengths[i] for b in timed for i in b)
    pad_frac = real / sum(len(b.feats) for b in padded_batches)
    model = AToken(preset(args.preset)).to(dev, dtype).train()
    tp_packed = fwd_bwd_tokens_per_s(model, packed_batches, real, dev, dtype, args.steps)
    tp_padded = fwd_bwd_tokens_per_s(model, padded_batches, real, dev, dtype, args.steps)
    result = {"device": str(dev), "dtype": str(dtype), "preset": args.preset, "samples": len(samples),
              "stream_tokens": sum(lengths), "token_budget": args.budget, "batches": len(bins),
              "timed_real_tokens": real,
              "packed_real_token_fraction": round(frac, 4), "padded_real_token_fraction": round(pad_frac, 4),
              "packed_tokens_per_s": round(tp_packed, 1), "padded_tokens_per_s": round(tp_padded, 1),
              "packed_over_padded": round(tp_packed / tp_padded, 3)}
    if dev.type == "cuda":
        base = AToken(preset("base")).to(dev, torch.bfloat16).train()
        params = sum(p.numel() for p in base.parameters())
        tps = fwd_bwd_tokens_per_s(base, packed_batches, real, dev, torch.bfloat16, args.steps)
        flops_per_token = 6 * params  # dense matmuls fwd+bwd; attention adds a few % at these lengths
        result.update({"base_bf16_tokens_per_s": round(tps, 1),
                       "base_bf16_mfu": round(tps * flops_per_token / (args.peak_tflops * 1e12), 4),
                       "base_peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
