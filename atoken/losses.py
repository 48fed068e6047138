"""Training losses with the paper's default weights (all configurable).

L = λ_rec·L_rec + λ_sem·L_sem + λ_KL·L_KL  (0.2, 1.0, 1e-8)
Image L_rec = 1·L1 + 10·perceptual + 1e3·Gram + 1·CLIP-perceptual; video and 3D L_rec = L1; 3D renders
L1 + 0.2·(1 − SSIM). Perceptual, Gram and CLIP-perceptual use a frozen feature network (FeatureNetwork)
at 224² by default. Semantic: SigLIP sigmoid loss (video / 3D / captioned images) and the distillation
KL(softmax(teacher/τ) ‖ softmax(student/τ)) with τ = 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoken.metrics import ssim


@dataclass
class LossWeights:
    rec: float = 0.2
    sem: float = 1.0
    kl: float = 1e-8
    l1: float = 1.0
    perceptual: float = 10.0
    gram: float = 1e3
    clip: float = 1.0
    render_ssim: float = 0.2
    distill_tau: float = 2.0

    def validate(self) -> "LossWeights":
        import dataclasses

        for f in dataclasses.fields(LossWeights):
            k, v = f.name, getattr(self, f.name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"losses.{k}={v!r}: must be a non-negative number")
        if self.distill_tau <= 0:
            raise ValueError(f"losses.distill_tau={self.distill_tau}: must be > 0")
        return self


def gram(f: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, C], normalised by C·H·W so the term is resolution-independent."""
    N, C, H, W = f.shape
    x = f.reshape(N, C, H * W).float()
    return x @ x.transpose(1, 2) / (C * H * W)


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class ImageReconstructionLoss(nn.Module):
    """L1 at native resolution plus feature-space terms on a frozen network (None: L1 only)."""

    def __init__(self, weights: LossWeights, feature_net: nn.Module | None = None):
        super().__init__()
        self.w = weights
        self.features = feature_net

    def describe(self) -> dict[str, str]:
        name = getattr(self.features, "name", None) or "none"
        res = getattr(self.features, "resolution", None)
        net = f"{name}@{res}" if self.features is not None else "none (L1 only)"
        return {"perceptual": net, "gram": net, "clip_perceptual": net, "l1": "pixels, native resolution"}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """pred/target [N, 3, H, W] in [-1, 1] -> dict of unweighted terms and the weighted 'total'."""
        terms = {"l1": (pred.float() - target.float()).abs().mean()}
        total = self.w.l1 * terms["l1"]
        if self.features is not None and (self.w.perceptual or self.w.gram or self.w.clip):
            fp, ep = self.features(((pred + 1) / 2).clamp(0, 1))
            with torch.no_grad():
                ft, et = self.features(((target + 1) / 2).clamp(0, 1))
            terms["perceptual"] = sum((_unit(a) - _unit(b)).pow(2).sum(1).mean() for a, b in zip(fp, ft)) / len(fp)
            terms["gram"] = sum((gram(a) - gram(b)).pow(2).mean() for a, b in zip(fp, ft)) / len(fp)
            terms["clip"] = (1 - F.cosine_similarity(ep.float(), et.float(), dim=-1)).mean()
            total = total + self.w.perceptual * terms["perceptual"] + self.w.gram * terms["gram"] + self.w.clip * terms["clip"]
        terms["total"] = total
        return terms


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Video and 3D reconstruction (paper: L1 only), averaged over tokens."""
    return (pred.float() - target.float()).abs().mean()


def render_loss(pred: torch.Tensor, target: torch.Tensor, ssim_weight: float = 0.2) -> dict[str, torch.Tensor]:
    """3D renders [N, 3, H, W] in [0, 1]: L1 + w·(1 − SSIM)."""
    l1 = (pred - target).abs().mean()
    s = ssim(pred, target).mean()
    return {"l1": l1, "ssim": s, "total": l1 + ssim_weight * (1 - s)}


def siglip_sigmoid_loss(visual: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                        logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss; row i of visual matches row i of text. Inputs L2-normalised."""
    logits = visual.float() @ text.float().T * logit_scale.exp() + logit_bias
    labels = 2 * torch.eye(len(visual), device=visual.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(visual)


def distillation_kl(student_sims: torch.Tensor, teacher_sims: torch.Tensor, tau: float = 2.0) -> torch.Tensor:
    """KL(softmax(teacher/τ) ‖ softmax(student/τ)) over the last axis (texts), mean over rows."""
    t = F.log_softmax(teacher_sims.float() / tau, dim=-1)
    s = F.log_softmax(student_sims.float() / tau, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def total_loss(rec: torch.Tensor | float, sem: torch.Tensor | float, kl: torch.Tensor | float,
               w: LossWeights) -> torch.Tensor | float:
    return w.rec * rec + w.sem * sem + w.kl * kl
