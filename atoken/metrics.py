"""Evaluation metrics: PSNR, SSIM, Fréchet distance, zero-shot / linear-probe accuracy, retrieval R@k.

Images are float tensors in [0, 1] shaped [N, 3, H, W] unless said otherwise.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, [N]."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    g = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-g.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5,
         reduce: bool = True) -> torch.Tensor:
    """SSIM (Wang et al. 2004) with an 11x11 Gaussian window, per image [N] (or the map if not reduce).
    Differentiable; used both as a metric and as the 3D render loss term."""
    x, y = x.float(), y.float()
    C = x.shape[1]
    win = min(window, x.shape[-1], x.shape[-2])
    win -= 1 - win % 2
    g = _gaussian_window(win, sigma, x.device, x.dtype)
    kx, ky = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1), g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)
    blur = lambda t: F.conv2d(F.conv2d(t, kx, groups=C), ky, groups=C)  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return m.flatten(1).mean(1) if reduce else m


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (FID's formula).

    tr sqrt(S1 S2) is computed in sample space: with centred features X1, X2 and S_i = X_i^T X_i / (n_i - 1),
    the non-zero eigenvalues of S1 S2 are those of M M^T with M = X1 X2^T / sqrt((n1 - 1)(n2 - 1)), so the
    trace is M's nuclear norm. Exact for any N and D, and an [N1, N2] SVD instead of a D x D matrix square
    root (1.7 s per call at D = 1280 on 2 cores; the eval step's largest cost)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 samples per set")
    mu1, mu2 = a.mean(0), b.mean(0)
    x1, x2 = (a - mu1) / np.sqrt(len(a) - 1), (b - mu2) / np.sqrt(len(b) - 1)
    cross = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum()
    return float(((mu1 - mu2) ** 2).sum() + (x1 ** 2).sum() + (x2 ** 2).sum() - 2 * cross)


def zero_shot_accuracy(image_emb: torch.Tensor, class_text_emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of nearest class-prompt embedding (cosine)."""
    sims = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_text_emb.float(), dim=-1).T
    return float((sims.argmax(1) == labels).float().mean())


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          c: float = 1.0) -> float:
    """Logistic-regression probe on frozen features (standardised)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    clf.fit(np.asarray(train_x), np.asarray(train_y))
    return float((clf.predict(np.asarray(test_x)) == np.asarray(test_y)).mean())


def retrieval_recall(query_emb: torch.Tensor, gallery_emb: torch.Tensor, ks: tuple[int, ...] = (1, 5),
                     query_keys: list | None = None, gallery_keys: list | None = None) -> dict[str, float]:
    """R@k of each query: a hit when a matching gallery item is among the k highest-scoring ones. Without
    keys query i's match is gallery i; with keys every gallery item of the query's key matches (clips
    of one video sharing its caption, digits sharing a class caption: scoring one of them first is
    correct, as the training loss counts them as positives). Also returns 'chance@k', the expected R@k
    of a random ordering, which depends on how many matches each query has."""
    sims = F.normalize(query_emb.float(), dim=-1) @ F.normalize(gallery_emb.float(), dim=-1).T
    if query_keys is None or gallery_keys is None:
        match = torch.eye(len(query_emb), len(gallery_emb), dtype=torch.bool)
    else:
        match = torch.tensor([[q == g for g in gallery_keys] for q in query_keys], dtype=torch.bool)
    if not bool(match.any(1).all()):
        raise ValueError("retrieval_recall: every query needs at least one matching gallery item")
    best = sims.masked_fill(~match, float("-inf")).max(1).values
    rank = ((sims > best[:, None]) & ~match).sum(1)  # non-matching items that beat the best match
    n, m = match.shape[1], match.sum(1).double()
    out = {}
    for k in ks:
        out[f"R@{k}"] = float((rank < k).float().mean())
        miss = torch.ones_like(m)  # P(no match in a random top k) = C(n - m, k) / C(n, k)
        for j in range(min(k, n)):
            miss = miss * ((n - m - j) / (n - j)).clamp(min=0)
        out[f"chance@{k}"] = float((1 - miss).mean())
    return out
