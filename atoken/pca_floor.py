"""The linear floors to beat: PCA over the model's own patches with the same latent size per patch.

`TokenPCA` fits k principal components of token vectors: an image's 16x16x3 frame-0 patch (768 values)
or a video's 4x16x16x3 space-time patch (3072). With `quantize`, the coefficients go through the same
scalar quantiser the model uses at the same bits (FSQ: each coefficient bounded and rounded to its
levels), with per-coefficient gains fitted on the training tokens. A learned tokenizer below these has
learned nothing a linear map would not.
"""
from __future__ import annotations

from typing import Callable

import torch

from atoken.init import fit_scalar_gains


class TokenPCA:
    def __init__(self, components: int):
        self.k = components
        self.mean: torch.Tensor | None = None
        self.basis: torch.Tensor | None = None
        self.quantize: Callable | None = None
        self.gains = self.scales = None

    def fit(self, tokens: torch.Tensor) -> "TokenPCA":
        """tokens [N, D] (float, any range)."""
        x = tokens.double()
        if len(x) < self.k:
            raise ValueError(f"PCA floor: {len(x)} training patches < {self.k} components; add training data")
        self.mean = x.mean(0)
        _, _, vt = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = vt[: self.k]
        return self

    def coefficients(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.double() - self.mean) @ self.basis.T

    def with_quantizer(self, quantize: Callable, train_tokens: torch.Tensor) -> "TokenPCA":
        """Quantised coefficients from now on; gains fitted on the training tokens' coefficients."""
        self.gains, self.scales, _ = fit_scalar_gains(self.coefficients(train_tokens), quantize)
        self.quantize = quantize
        return self

    def reconstruct(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.coefficients(tokens)
        if self.quantize is not None:
            c = self.quantize((c * self.gains).float()).double() * self.scales
        return (c @ self.basis + self.mean).to(tokens.dtype)
