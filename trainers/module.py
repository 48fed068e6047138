"""The module DeepSpeed trains: AToken plus the text projection, with one loss function per task."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoken.losses import ImageReconstructionLoss, distillation_kl, render_loss, siglip_sigmoid_loss
from atoken.model import AToken
from atoken.patchify import pack, unpack
from trainers.config import TrainConfig
from trainers.data import Sample


def caption_targets(captions: list[str]) -> torch.Tensor:
    """[B, B] +1 where two samples share a caption (a positive pair), -1 elsewhere: digits of one class
    share their caption and must not be pushed apart as negatives."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    k = torch.tensor([ids[c] for c in captions])
    return (k[:, None] == k[None, :]).float() * 2 - 1


class TrainModule(nn.Module):
    """`trim_padding` (on) packs a batch of images or 3D voxels with their one frame per token, which the
    model reads and writes narrow (`atoken.layers.TrimmableLinear`); off, it packs the released model's
    4-frame tokens: the same losses and gradients with ~1.5x the arithmetic (the reference tests use)."""

    def __init__(self, model: AToken, text_dim: int, feature_net: nn.Module | None, cfg: TrainConfig,
                 text_projection: torch.Tensor | None = None, teacher: nn.Module | None = None,
                 trim_padding: bool = True):
        super().__init__()
        self.model = model
        self.trim_padding = trim_padding
        width = model.config.encoder_model_channels
        # maps the text tower's embedding into the semantic head's space (identity-sized for SigLIP2 So400m)
        self.text_proj = nn.Linear(text_dim, width, bias=False)
        if text_projection is not None and text_projection.shape == self.text_proj.weight.shape:
            with torch.no_grad():
                self.text_proj.weight.copy_(text_projection)
        else:
            nn.init.normal_(self.text_proj.weight, std=text_dim ** -0.5)
        # frozen and outside the module tree, so ZeRO-3 neither partitions nor checkpoints them
        self.__dict__["rec_loss"] = ImageReconstructionLoss(cfg.losses, feature_net)
        self.__dict__["teacher"] = teacher
        self.cfg = cfg

    def forward(self, task: str, samples: list[Sample], text: torch.Tensor | None = None, step: int = 0) -> dict:
        dev = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        batch = pack([(s.modality, s.data) for s in samples], self.model.config.patch_size,
                     self.model.config.in_channels, trim_padding=self.trim_padding).to(dev, dtype)
        w = self.cfg.losses
        if task.endswith("_und"):
            enc = self.model.encode_sparse(batch)
            t = F.normalize(self.text_proj(text.to(dev, dtype)), dim=-1)
            if task == "image_und" and self.teacher is not None:
                # paper: images distil the frozen teacher's image-text similarities over the batch's texts
                captions = [s.caption for s in samples]
                teacher = self.teacher.similarities([s.data for s in samples], captions).to(dev)
                student = enc.semantic.float() @ t.float().T * self.model.logit_scale.exp() + self.model.logit_bias
                kl = distillation_kl(student, teacher, w.distill_tau)
                return {"distill": kl, "total": w.sem * kl}
            targets = caption_targets([s.caption for s in samples]).to(dev)
            sem = siglip_sigmoid_loss(enc.semantic, t, self.model.logit_scale, self.model.logit_bias, targets)
            return {"sem": sem, "total": w.sem * sem}
        out = self.model(batch, sample=True)
        rec, target = out["rec"], batch.feats
        _, ph, pw = self.model.config.patch_size
        fp = ph * pw * 3  # one frame's channels
        terms: dict[str, torch.Tensor] = {}
        if task in ("image_rec", "3d_rec"):  # frame 0 only: an image's padding is discarded
            diff = rec[:, :fp].float() - target[:, :fp].float()
        else:
            diff = rec.float() - target.float()
        terms["l1"], terms["mse"] = diff.abs().mean(), diff.pow(2).mean()
        rec_total = w.l1 * terms["l1"] + w.mse * terms["mse"]
        if task == "image_rec" and self.rec_loss.needs_features(step):
            pred_imgs = _resized(unpack(batch, rec, self.model.config.patch_size), w.feature_resolution)
            true_imgs = _resized(unpack(batch, target, self.model.config.patch_size), w.feature_resolution)
            feat = self.rec_loss.feature_terms(pred_imgs, true_imgs, step)
            rec_total = rec_total + feat.pop("weighted")
            terms.update(feat)
        elif task == "3d_rec" and self.model.gs_decoder is not None and self.cfg.data.render_views > 0:
            r = self._render_loss(rec[:, :fp], batch.coords, samples, step)
            terms.update({"render_l1": r["l1"], "render_ssim": r["ssim"]})
            rec_total = rec_total + r["total"]
        kl = out["posterior"].kl() if self.model.quantizer is None else rec.new_zeros(())
        terms["kl"] = kl
        terms["total"] = w.rec * rec_total + w.kl * kl
        return terms

    def _render_loss(self, voxel_rgb: torch.Tensor, coords: torch.Tensor, samples: list[Sample], step: int) -> dict:
        res, nv = self.cfg.data.render_resolution, self.cfg.data.render_views
        g = self.model.gs_decoder(voxel_rgb, coords)
        preds, targets = [], []
        for b, s in enumerate(samples):
            v = s.views
            V, H = v["rgb"].shape[0], v["rgb"].shape[1]
            idx = [(step * nv + k) % V for k in range(nv)]  # rotate through the stored views
            Ks = v["Ks"][idx].clone()
            Ks[:, :2] *= res / H
            out = self.model.gs_decoder.render(g.select(b), v["viewmats"][idx].to(voxel_rgb.device),
                                               Ks.to(voxel_rgb.device), res, res)
            preds.append(out.rgb.permute(0, 3, 1, 2))
            tgt = v["rgb"][idx].permute(0, 3, 1, 2).to(voxel_rgb.device)
            targets.append(F.interpolate(tgt, size=(res, res), mode="bilinear", antialias=True, align_corners=False))
        # not clamped: a clamp would stop the gradient of every colour that left [0, 1], and such a colour never returns
        return render_loss(torch.cat(preds).float(), torch.cat(targets).float(), self.cfg.losses.render_ssim)


def _resized(images: list[torch.Tensor], res: int) -> torch.Tensor:
    """Per-sample [1, H, W, 3] -> one [N, 3, res, res] batch (the paper computes feature losses at 224²)."""
    return torch.cat([F.interpolate(im[:1].permute(0, 3, 1, 2).float(), size=(res, res), mode="bilinear",
                                    align_corners=False, antialias=True) for im in images])
