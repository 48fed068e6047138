"""Training losses with the paper's default weights (all configurable, feature terms schedulable).

L = λ_rec·L_rec + λ_sem·L_sem + λ_KL·L_KL  (0.2, 1.0, 1e-8)
Image L_rec = 1·L1 + 10·perceptual + 1e3·Gram + 1·CLIP-perceptual; video and 3D L_rec = L1; 3D renders
L1 + 0.2·(1 − SSIM). Perceptual, Gram and CLIP-perceptual use a frozen feature network (FeatureNetwork)
at 224² by default. Semantic: SigLIP sigmoid loss (video / 3D / captioned images) and the distillation
KL(softmax(teacher/τ) ‖ softmax(student/τ)) with τ = 2.

The feature terms are `Scheduled`: off before `start`, then ramped linearly to their weight (Cosmos
Tokenizer's training code schedules its Gram and LPIPS weights by iteration the same way). A term whose
weight is 0 at a step costs nothing: the feature network does not run.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoken.metrics import ssim


@dataclass
class Scheduled:
    """A loss weight by step: 0 before `start`, then a linear ramp over `ramp` steps up to `weight`."""

    weight: float = 0.0
    start: int = 0
    ramp: int = 0

    def at(self, step: int) -> float:
        if step < self.start or self.weight == 0:
            return 0.0
        if self.ramp <= 0:
            return float(self.weight)
        return float(self.weight) * min(1.0, (step - self.start + 1) / self.ramp)


@dataclass
class LossWeights:
    rec: float = 0.2
    sem: float = 1.0
    kl: float = 1e-8
    l1: float = 1.0
    mse: float = 0.0  # not in the paper; PSNR is an MSE figure, so short runs that must show it add it
    perceptual: Scheduled = field(default_factory=lambda: Scheduled(10.0))
    gram: Scheduled = field(default_factory=lambda: Scheduled(1e3))
    clip: Scheduled = field(default_factory=lambda: Scheduled(1.0))
    render_ssim: float = 0.2
    distill_tau: float = 2.0  # image understanding distils from the teacher when one is configured

    def validate(self) -> "LossWeights":
        for f in fields(LossWeights):
            k, v = f.name, getattr(self, f.name)
            if isinstance(v, Scheduled):
                for part in ("weight", "start", "ramp"):
                    x = getattr(v, part)
                    if not isinstance(x, (int, float)) or x < 0:
                        raise ValueError(f"losses.{k}.{part}: {x!r} must be a non-negative number")
            elif not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"losses.{k}: {v!r} must be a non-negative number")
        if self.distill_tau <= 0:
            raise ValueError(f"losses.distill_tau: {self.distill_tau} must be > 0")
        return self

    def feature_weights(self, step: int) -> dict[str, float]:
        return {"perceptual": self.perceptual.at(step), "gram": self.gram.at(step), "clip": self.clip.at(step)}


def gram(f: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, C], normalised by C·H·W so the term is resolution-independent."""
    N, C, H, W = f.shape
    x = f.reshape(N, C, H * W).float()
    return x @ x.transpose(1, 2) / (C * H * W)


def _unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


class ImageReconstructionLoss(nn.Module):
    """L1 (+ MSE) at native resolution plus scheduled feature-space terms on a frozen network."""

    def __init__(self, weights: LossWeights, feature_net: nn.Module | None = None):
        super().__init__()
        self.w = weights
        self.features = feature_net

    def describe(self) -> dict[str, str]:
        name = getattr(self.features, "name", None) or "none"
        res = getattr(self.features, "resolution", None)
        net = f"{name}@{res}" if self.features is not None else "none (L1 only)"
        return {"perceptual": net, "gram": net, "clip_perceptual": net, "l1": "pixels, native resolution"}

    def needs_features(self, step: int) -> bool:
        return self.features is not None and any(v > 0 for v in self.w.feature_weights(step).values())

    def feature_terms(self, pred: torch.Tensor, target: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """pred/target [N, 3, H, W] in [-1, 1] -> the unweighted feature terms and their weighted sum
        ('weighted'); empty when every feature weight is 0 at this step (no network forward)."""
        if not self.needs_features(step):
            return {}
        w = self.w.feature_weights(step)
        fp, ep = self.features(((pred + 1) / 2).clamp(0, 1))
        with torch.no_grad():
            ft, et = self.features(((target + 1) / 2).clamp(0, 1))
        terms = {"perceptual": sum((_unit(a) - _unit(b)).pow(2).sum(1).mean() for a, b in zip(fp, ft)) / len(fp),
                 "gram": sum((gram(a) - gram(b)).pow(2).mean() for a, b in zip(fp, ft)) / len(fp),
                 "clip": (1 - F.cosine_similarity(ep.float(), et.float(), dim=-1)).mean()}
        terms["weighted"] = sum(w[k] * terms[k] for k in ("perceptual", "gram", "clip"))
        return terms

    def forward(self, pred: torch.Tensor, target: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """pred/target [N, 3, H, W] in [-1, 1] -> dict of unweighted terms and the weighted 'total'."""
        diff = pred.float() - target.float()
        terms = {"l1": diff.abs().mean(), "mse": diff.pow(2).mean()}
        total = self.w.l1 * terms["l1"] + self.w.mse * terms["mse"]
        feat = self.feature_terms(pred, target, step)
        if feat:
            total = total + feat.pop("weighted")
            terms.update(feat)
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
                        logit_bias: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss over the batch's [B, B] pairs. Inputs L2-normalised. `targets` is +1
    for matching pairs and -1 otherwise (default: row i of visual matches row i of text only)."""
    logits = visual.float() @ text.float().T * logit_scale.exp() + logit_bias
    labels = targets if targets is not None else 2 * torch.eye(len(visual), device=visual.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(visual)


def distillation_kl(student_sims: torch.Tensor, teacher_sims: torch.Tensor, tau: float = 2.0) -> torch.Tensor:
    """KL(softmax(teacher/τ) ‖ softmax(student/τ)) over the last axis (texts), mean over rows."""
    t = F.log_softmax(teacher_sims.float() / tau, dim=-1)
    s = F.log_softmax(student_sims.float() / tau, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")
