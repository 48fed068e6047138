"""The linear floor to beat: PCA per 16x16 patch with the same latent size per patch.

A learned tokenizer whose PSNR is below this codec's has learned nothing a linear map would not.
"""
from __future__ import annotations

import numpy as np


def _patches(img: np.ndarray, p: int) -> np.ndarray:
    H, W, C = img.shape
    h, w = H - H % p, W - W % p
    x = img[:h, :w].reshape(h // p, p, w // p, p, C).transpose(0, 2, 1, 3, 4)
    return x.reshape(-1, p * p * C)


class PatchPCA:
    """Fits k principal components of p x p x 3 patches; encode/decode = project/reconstruct."""

    def __init__(self, components: int, patch: int = 16):
        self.k, self.p = components, patch
        self.mean: np.ndarray | None = None
        self.basis: np.ndarray | None = None

    def fit(self, images: list[np.ndarray]) -> "PatchPCA":
        X = np.concatenate([_patches(np.asarray(im, np.float64), self.p) for im in images])
        if len(X) < self.k:
            raise ValueError(f"PCA floor: {len(X)} patches < {self.k} components; add training images")
        self.mean = X.mean(0)
        _, _, vt = np.linalg.svd(X - self.mean, full_matrices=False)
        self.basis = vt[: self.k]
        return self

    def reconstruct(self, img: np.ndarray) -> np.ndarray:
        """img [H, W, 3] float in [0, 1] -> reconstruction of its patch-aligned crop."""
        p = self.p
        H, W, C = img.shape
        h, w = H - H % p, W - W % p
        X = _patches(np.asarray(img, np.float64), p)
        rec = (X - self.mean) @ self.basis.T @ self.basis + self.mean
        rec = rec.reshape(h // p, w // p, p, p, C).transpose(0, 2, 1, 3, 4).reshape(h, w, C)
        return np.clip(rec, 0, 1)

    def psnr(self, img: np.ndarray) -> float:
        p = self.p
        crop = np.asarray(img, np.float64)[: img.shape[0] - img.shape[0] % p, : img.shape[1] - img.shape[1] % p]
        mse = max(float(((self.reconstruct(img) - crop) ** 2).mean()), 1e-12)
        return 10 * np.log10(1.0 / mse)
