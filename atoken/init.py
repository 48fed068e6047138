"""Initialisation that starts a fresh tokenizer at a sensible output, and transitions that keep it.

- `standard_init`: zero-initialised residual branches and output layer (each block starts as the identity
  and the decoder emits the mean image instead of per-pixel noise), SigLIP-scaled position tables.
- `linear_path_init`: a data-dependent start *at* the linear codec: the encoder's input layer holds the
  principal components of the training patches, the KL projection reads them, and the decoder's output
  layer is the least-squares readout of its own features. Layer norms are kept linear by a constant
  "carrier" pair of channels (±a): a token's norm is then dominated by the carrier, so normalisation is
  a near-constant scale. The carrier rides on biases (encoder) and on a constant position table
  (decoder, which has no biases).
- `refit_readout`: least-squares refit of the decoder's output layer on the current features (used at
  latent growth, where new channels open).
- `fit_fsq_gains`: per-channel latent gains at the FSQ switch, so that quantisation fits the latent's
  range instead of saturating or collapsing it.

All functions are pure torch on a model and a tensor of training tokens; nothing here reads data.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from atoken.patchify import pack

CARRIER = 2  # channels at the end of the residual stream that carry the constant ±a


def _stacks(model) -> list:
    return [model.encoder, model.decoder]


@torch.no_grad()
def standard_init(model, encoder: bool = True) -> None:
    """Zero residual-branch outputs and decoder output; position tables at SigLIP's 1/sqrt(width).
    `encoder=False` leaves a pretrained encoder as it is."""
    for stack in _stacks(model) if encoder else [model.decoder]:
        for block in stack.blocks:
            for lin in (block.attn.to_out, block.mlp.mlp[2]):
                nn.init.zeros_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        table = stack.pos_embedder.position_embedding.weight
        nn.init.normal_(table, std=table.shape[1] ** -0.5)
    nn.init.zeros_(model.decoder.out_layer.weight)
    if model.decoder.out_layer.bias is not None:
        nn.init.zeros_(model.decoder.out_layer.bias)


@torch.no_grad()
def fresh_sigmoid_init(model) -> None:
    """The sigmoid loss's temperature and bias as SigLIP trains them from scratch (t' = log 10, b = -10);
    the release's converged constants (exp(4.84) ~ 127, -15.6) suit only a model continued from its
    weights: on a fresh encoder they blow the loss up (measured: 2,538 at the end of stage 2)."""
    model.logit_scale.fill_(math.log(10.0))
    model.logit_bias.fill_(-10.0)


def _lstsq(features: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Ridge least squares W with features @ W.T ~ targets (float64)."""
    f, t = features.double(), targets.double()
    gram = f.T @ f
    gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram, f.T @ t).T


def tokens_of(samples: list[tuple[str, torch.Tensor]], patch, in_channels: int, static_targets: bool = True):
    """Packed tokens of `samples` and their readout targets: an image's padded frames are not part of its
    loss, so its target repeats frame 0 there (a static patch) — the readout then decodes a video token
    whose temporal weights are still zero as its first frame held, instead of grey."""
    batch = pack(samples, patch, in_channels)
    x = batch.feats
    y = x.clone()
    if static_targets:
        fp = x.shape[1] // patch[0]
        img = torch.tensor([batch.modalities[int(b)] == "image" for b in batch.coords[:, 0]])
        y[img] = x[img, :fp].repeat(1, patch[0])
    return batch, x, y


@torch.no_grad()
def linear_path_init(model, samples: list[tuple[str, torch.Tensor]], components: int | None = None,
                     carrier_ratio: float = 8.0, logvar: float = -8.0) -> dict:
    """Starts a fresh model at the PCA codec of `samples` (images and/or videos in [-1, 1]).

    `components` (default: twice the latent, at most the width minus the carrier and a quarter of the
    width) principal components go into encoder channels; the rest stay zero, free for what a later
    stage adds (temporal rows at latent growth). Returns figures of the fit."""
    cfg = model.config
    standard_init(model)
    enc, dec = model.encoder, model.decoder
    W_e, W_d, k = cfg.encoder_model_channels, cfg.decoder_model_channels, cfg.latent_channels
    batch, x, y = tokens_of(samples, cfg.patch_size, cfg.in_channels)
    x64 = x.double()
    mu = x64.mean(0)
    _, s, vt = torch.linalg.svd(x64 - mu, full_matrices=False)
    m = min(components or 2 * k, W_e - CARRIER - W_e // 4, len(s))
    if m < k:
        raise ValueError(f"linear_path_init: {m} components available (samples or encoder width) < latent {k}")
    sigma = (s[:m] / math.sqrt(max(len(x) - 1, 1))).clamp_min(1e-6)
    basis = vt[:m] / sigma[:, None]  # whitened: unit variance per component
    coeff = (x64 - mu) @ basis.T
    a = carrier_ratio * float(coeff.pow(2).sum(1).mean().sqrt())

    # encoder: input layer = whitened PCA + carrier bias; zero position table
    w = torch.zeros(W_e, cfg.in_channels, dtype=torch.float64)
    b = torch.zeros(W_e, dtype=torch.float64)
    w[:m] = basis
    b[:m] = -(basis @ mu)
    b[W_e - 2], b[W_e - 1] = a, -a
    enc.input_layer.weight.copy_(w)
    if enc.input_layer.bias is None:
        raise ValueError("linear_path_init needs an encoder input layer with bias (encoder_use_bias)")
    enc.input_layer.bias.copy_(b)
    enc.pos_embedder.position_embedding.weight.zero_()

    # the output norm: the carrier has done its job (a constant norm inside the stack); its channels leave
    # the encoder as one small constant (for the log-variance rows), and the signal leaves at unit size,
    # so the semantic head does not see tokens dominated by two constant channels
    post = enc.post_layernorm
    scale = a * math.sqrt(2.0 / W_e)  # ~ the norm's divisor: the carrier dominates each token's std
    post.weight.fill_(scale)
    post.weight[W_e - CARRIER:] = 0
    post.bias.zero_()
    post.bias[W_e - 2] = 1.0
    # projection: least squares from the encoder's tokens to the first k components; small fixed logvar
    tokens = model.encoder(batch.feats.to(enc.input_layer.weight.dtype), batch.coords).double()
    mean_rows = _lstsq(tokens, coeff[:, :k])
    lv_rows = torch.zeros(k, W_e, dtype=torch.float64)
    lv_rows[:, W_e - 2] = logvar  # the constant 1 channel
    model.proj.weight.copy_(torch.cat([mean_rows, lv_rows]))

    # decoder: latent into channels 0..k-1, constant carrier position table, least-squares readout
    dw = torch.zeros(W_d, k, dtype=torch.float64)
    dw[:k, :k] = torch.eye(k, dtype=torch.float64)
    dec.input_layer.weight.copy_(dw)
    table = dec.pos_embedder.position_embedding.weight
    table.zero_()
    a_dec = carrier_ratio * math.sqrt(k)  # the latent has unit variance per channel
    table[:, W_d - 2], table[:, W_d - 1] = a_dec, -a_dec
    fit = refit_readout(model, batch, y)
    explained = float((s[:k] ** 2).sum() / (s ** 2).sum())
    return {"components": m, "carrier": a, "explained_variance": explained, **fit}


@torch.no_grad()
def decoder_features(model, latent: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The decoder's normalised final features (what out_layer reads)."""
    dec = model.decoder
    h, _ = dec.run(latent, coords, None)
    return dec.out_norm(h)


@torch.no_grad()
def refit_readout(model, batch, targets: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Least-squares decoder output layer on the model's own features for these tokens (posterior mean,
    or FSQ values once quantising). Returns the train-token MSE before and after."""
    enc = model.encode_sparse(batch.to(batch.feats.device, model.proj.weight.dtype))
    latent, _ = model.bottleneck(enc, sample=False)
    feats = decoder_features(model, latent, batch.coords).double()
    before = float((model.decoder.out_layer(feats.to(model.proj.weight.dtype)).double() - targets.double()).pow(2).mean())
    w = _lstsq(feats, targets)
    model.decoder.out_layer.weight.copy_(w)
    after = float((feats @ w.T - targets.double()).pow(2).mean())
    return {"readout_mse_before": before, "readout_mse_after": after}


def _readout_mask(batch, patch) -> torch.Tensor:
    """[L, out] 1 where a token's output counts: an image's padded frames never do."""
    L, D = len(batch.coords), patch[0] * patch[1] * patch[2] * 3
    fp = D // patch[0]
    mask = torch.ones(L, D, dtype=torch.float64)
    img = torch.tensor([batch.modalities[int(b)] == "image" for b in batch.coords[:, 0]])
    mask[img, fp:] = 0
    return mask


@torch.no_grad()
def _reconstruct(model, batch) -> torch.Tensor:
    enc = model.encode_sparse(batch)
    latent, _ = model.bottleneck(enc, sample=False)
    return model.decode_sparse(latent, batch.coords).double()


def _masked_mse(a, b, mask) -> float:
    return float(((a - b) ** 2 * mask).sum() / mask.sum())


@torch.no_grad()
def add_temporal_rows(model, video_tokens: torch.Tensor, rows: int) -> int:
    """Gives the encoder's input layer `rows` principal components of video tokens' frames 1..3 (whitened),
    added to the frames-1..3 columns of the channels whose frame-0 weights are weakest. An image is zero
    in frames 1..3, so no image's tokens change; a video token's encoding starts to see its motion.
    Returns how many rows were added."""
    cfg = model.config
    fp = cfg.in_channels // cfg.patch_size[0]
    W_e = cfg.encoder_model_channels
    xt = video_tokens[:, fp:].double()
    if rows <= 0 or len(xt) <= rows:
        return 0
    _, s, vt = torch.linalg.svd(xt - xt.mean(0), full_matrices=False)
    sigma = (s[:rows] / math.sqrt(len(xt) - 1)).clamp_min(1e-6)
    w = model.encoder.input_layer.weight
    spatial = w.detach()[:, :fp].abs().sum(1)
    spatial[W_e - CARRIER:] = float("inf")
    free = torch.argsort(spatial)[:rows]
    w[free, fp:] += (vt[:rows] / sigma[:, None]).to(w.dtype)
    return rows


@torch.no_grad()
def grow_latent_from_data(model, samples: list[tuple[str, torch.Tensor]], channels: int, gain: float = 1.0,
                          ridge: float = 1e-2, temporal_rows: int = 0) -> dict:
    """Widens the latent to `channels` so that the new channels carry what the model misses.

    The new channels are the principal components of the residual (targets minus the current
    reconstruction, where the loss counts; each modality's residual weighted to equal energy, so video's
    3072-value patches do not crowd out images). The encoder side reads them from the encoder's tokens by
    ridge least squares (a low-dimensional fit: width -> new channels). The decoder writes them along the
    directions of its final features that carry the least energy, and its output layer reads exactly that
    subspace with the components' basis vectors (nothing high-dimensional is fitted, so it generalises
    like PCA), its old readout of those directions removed. Measured on the main job's photos: a stage-1
    model at 20.78 dB against a PCA-48 floor of 20.75 grows to 20.99 dB (21.18 from image residuals
    alone), where zero-initialised new channels stay at 20.78 (docs/model.md). If the training error does
    not fall, the growth falls back to zero-initialised channels (reconstruction unchanged)."""
    cfg = model.config
    old, new = cfg.latent_channels, channels - cfg.latent_channels
    if new <= 0:
        return {"grown": 0}
    dtype = model.proj.weight.dtype
    W_d = cfg.decoder_model_channels
    batch, _, y = tokens_of(samples, cfg.patch_size, cfg.in_channels)
    batch = batch.to(batch.feats.device, dtype)
    mask = _readout_mask(batch, cfg.patch_size)
    rec = _reconstruct(model, batch)
    before = _masked_mse(rec, y.double(), mask)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    vid = torch.tensor([batch.modalities[int(b)] == "video" for b in batch.coords[:, 0]])
    t_rows = add_temporal_rows(model, batch.feats[vid], temporal_rows) if bool(vid.any()) else 0
    if t_rows:
        rec = _reconstruct(model, batch)  # video tokens now encode differently (images do not)

    resid = (y.double() - rec) * mask
    mods = [batch.modalities[int(b)] for b in batch.coords[:, 0]]
    weight = torch.ones(len(resid), dtype=torch.float64)
    for m in set(mods):
        sel = torch.tensor([x == m for x in mods])
        weight[sel] = 1.0 / resid[sel].pow(2).sum().sqrt().clamp_min(1e-12)
    _, _, vt = torch.linalg.svd((resid - resid.mean(0)) * weight[:, None], full_matrices=False)
    basis = vt[:new]
    coeff = resid @ basis.T
    scale = coeff.std(0).clamp_min(1e-8)

    dec = model.decoder
    latent, _ = model.bottleneck(model.encode_sparse(batch), sample=False)
    h, _ = dec.run(latent, batch.coords, None)
    h = h.double()[:, : W_d - CARRIER]
    _, vecs = torch.linalg.eigh(h.T @ h / len(h))  # ascending energy
    D = torch.zeros(W_d, new, dtype=torch.float64)
    D[: W_d - CARRIER] = vecs[:, :new]

    model.grow_latent(channels)
    tokens = model.encoder(batch.feats, batch.coords).double()
    model.proj.weight[old:channels] = _lstsq(tokens, coeff / scale, ridge).to(dtype)
    dec.input_layer.weight[:, old:channels] = (D * gain).to(dtype)
    latent, _ = model.bottleneck(model.encode_sparse(batch), sample=False)
    h2, _ = dec.run(latent, batch.coords, None)
    rms = h2.double().pow(2).mean(-1).add(cfg.norm_eps).sqrt().mean()
    norm_w = dec.out_norm.weight.detach().double() if hasattr(dec.out_norm, "weight") else torch.ones(W_d, dtype=torch.float64)
    # out = W n(h) with n(h) = h * norm_w / rms: read D^T h / gain = z_new back as basis^T (scale * z_new)
    read = (basis.T * scale[None, :]) @ ((D / norm_w[:, None]).T * rms / gain)
    keep = torch.eye(W_d, dtype=torch.float64) - D @ D.T
    dec.out_layer.weight.copy_((dec.out_layer.weight.detach().double() @ keep + read).to(dtype))
    after = _masked_mse(_reconstruct(model, batch), y.double(), mask)
    if not after < before:
        cur = model.state_dict()
        for k, v in saved.items():
            if cur[k].shape == v.shape:
                cur[k].copy_(v)
        model.proj.weight[old:channels] = 0
        model.proj.weight[channels:channels + old] = saved["proj.weight"][old:]
        model.proj.weight[:old] = saved["proj.weight"][:old]
        dec.input_layer.weight[:, old:] = 0
        return {"grown": new, "method": "zero", "train_mse_before": before, "train_mse_after_data": after}
    return {"grown": new, "method": "data", "temporal_rows": t_rows, "train_mse_before": before, "train_mse_after": after}


@torch.no_grad()
def fit_scalar_gains(z: torch.Tensor, quantize, gains: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel (gain g, scale s) minimising mean((s * quantize(g * z) - z)^2) over the samples `z`
    [N, C], for a quantiser that acts on each channel alone (FSQ bounds and rounds per channel). Returns
    (g, s, the mean squared error reached)."""
    z = z.double()
    grid = gains if gains is not None else torch.logspace(-1.5, 1.2, 55, dtype=torch.float64)
    best_err = torch.full((z.shape[1],), float("inf"), dtype=torch.float64)
    best_g = torch.ones(z.shape[1], dtype=torch.float64)
    best_s = torch.ones(z.shape[1], dtype=torch.float64)
    for g in grid:
        q = quantize((z * g).float()).double()
        s = (q * z).sum(0) / q.pow(2).sum(0).clamp_min(1e-12)
        err = (q * s - z).pow(2).mean(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_g = torch.where(better, g.expand_as(best_g), best_g)
        best_s = torch.where(better, s, best_s)
    return best_g, best_s, float(best_err.mean())


@torch.no_grad()
def fsq_switch_from_data(model, samples: list[tuple[str, torch.Tensor]]) -> dict:
    """Switches a continuous model to FSQ (stage 4) so that the quantiser fits its latents: each
    channel's KL-mean row is scaled by a gain that spreads the latent over the FSQ levels, and the
    decoder's input column by the scale that maps the levels back to the latent the decoder learned.
    Without it, a latent of std ~1 is squashed by FSQ's tanh onto few of its 4 levels."""
    from atoken.bottleneck import FSQ

    cfg = model.config
    batch, _, _ = tokens_of(samples, cfg.patch_size, cfg.in_channels)
    batch = batch.to(batch.feats.device, model.proj.weight.dtype)
    z = model.encode_sparse(batch).posterior.mean
    fsq = FSQ(cfg.fsq_levels, cfg.fsq_num_codebooks)
    quantize = lambda x: fsq(x)[0]  # noqa: E731
    plain = float((quantize(z).double() - z.double()).pow(2).mean())
    g, s, fitted = fit_scalar_gains(z, quantize)
    k = cfg.latent_channels
    model.proj.weight[:k] *= g[:, None].to(model.proj.weight.dtype)
    model.decoder.input_layer.weight[:, :k] *= s[None, :].to(model.proj.weight.dtype)
    model.enable_fsq()
    return {"latent_mse_plain_fsq": plain, "latent_mse_fitted_fsq": fitted,
            "gain_median": float(g.median()), "latent_var": float(z.double().var(0).mean())}


def _voxel_centre_colours(views: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, voxels: torch.Tensor,
                          grid: int) -> torch.Tensor:
    """[N, 3] colour of the pixel each voxel centre projects to in its nearest view (the view
    voxel_features_from_views takes its patch from)."""
    from atoken.patchify import voxel_centers

    V, H, W, _ = views.shape
    c = voxel_centers(voxels, grid)
    cam = torch.einsum("vij,nj->vni", viewmats.float(), torch.cat([c, torch.ones(len(c), 1)], 1))[..., :3]
    uvw = torch.einsum("vij,vnj->vni", Ks.float(), cam)
    u, v = uvw[..., 0] / uvw[..., 2].clamp_min(1e-8), uvw[..., 1] / uvw[..., 2].clamp_min(1e-8)
    inside = (cam[..., 2] > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    best = torch.where(inside, cam[..., 2], torch.full_like(u, float("inf"))).argmin(0)
    n = torch.arange(len(c))
    px, py = u[best, n].long().clamp(0, W - 1), v[best, n].long().clamp(0, H - 1)
    return views[best, py, px]


def _gs_features(gs, rec: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """The Gaussian decoder's normalised features (what its output layer reads)."""
    from atoken.gaussian import sinusoidal_3d

    cfg = gs.cfg
    h = gs.input_layer(rec) + sinusoidal_3d(coords[:, 2:], cfg.model_channels).to(rec.dtype)
    for i, block in enumerate(gs.blocks):
        seg = gs._windows(coords, cfg.window_size // 2 if i % 2 else 0)
        x = h[seg.order]
        rot = torch.ones(len(x), (cfg.model_channels // cfg.num_heads) // 2, dtype=torch.complex64, device=x.device)
        y = block(x, rot, seg.cu)
        h = y if seg.inverse is None else y[seg.inverse]
    return torch.nn.functional.layer_norm(h.float(), (h.shape[-1],))


def _ridge_held_out(X: torch.Tensor, Y: torch.Tensor, groups: torch.Tensor,
                    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)) -> float:
    """The ridge whose fits best predict held-out rows: each asset from the others when there are two or
    more (a new asset is what the decoder must colour), else one half of the rows from the other. A few
    hundred voxels against a width of hundreds of features: a weak ridge fits each voxel exactly with large
    weights, and the first optimiser steps then throw every colour out of [0, 1] (measured: all renders
    black after three steps at lr 3e-4 with ridge 1e-3)."""
    ids = groups.unique()
    if len(ids) >= 2:
        folds = [(groups != g, groups == g) for g in ids]
    else:
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
        a = torch.zeros(len(X), dtype=torch.bool)
        a[perm[: len(X) // 2]] = True
        folds = [(a, ~a), (~a, a)]
    err = {r: sum(float((X[te] @ _lstsq(X[tr], Y[tr], r).T - Y[te]).pow(2).mean()) for tr, te in folds)
           for r in ridges}
    return min(err, key=err.get)


@torch.no_grad()
def gaussian_decoder_init(model, assets: list[dict], scales: tuple[float, ...] = (0.25, 0.5, 1.0),
                          opacities: tuple[float, ...] = (0.3, 0.6, 0.9)) -> dict:
    """A fresh Gaussian decoder that starts by drawing each voxel in its own colour, at a size and opacity
    chosen on the data. `assets`: dicts with voxel_feats [N, 768] in [0, 1], voxels [N, 3], views
    [V, H, W, 3] in [0, 1], viewmats, Ks, grid.

    The colour rows of its output layer are the least-squares map from its features (of the model's
    reconstruction of the voxel patches) to the colour of the pixel each voxel centre projects to; then
    the Gaussians' scale (as a fraction of the configured size) and opacity are chosen by rendering the
    assets' views and keeping the pair with the lowest error. Without it the decoder starts with faint
    grey blobs (measured on the main job's held-out asset: 1.4 dB above the background-only render)."""
    from atoken.gaussian import SH_C0

    gs = model.gs_decoder
    cfg, K = gs.cfg, gs.cfg.gaussians_per_voxel
    dtype = model.proj.weight.dtype
    feats, target, per_asset = [], [], []
    for a in assets:
        batch = model.pack([("3d", (a["voxel_feats"], a["voxels"]))]).to(a["voxel_feats"].device, dtype)
        rec = _reconstruct(model, batch).to(dtype)[:, : cfg.in_channels]
        f = _gs_features(gs, rec, batch.coords).double()
        feats.append(f)
        target.append(_voxel_centre_colours(a["views"], a["viewmats"], a["Ks"], a["voxels"], a["grid"]).double())
        per_asset.append((rec, batch.coords))
    F_, C = torch.cat(feats), torch.cat(target)
    X = torch.cat([F_, torch.ones(len(F_), 1, dtype=torch.float64)], 1)
    groups = torch.cat([torch.full((len(f),), i) for i, f in enumerate(feats)])
    ridge = _ridge_held_out(X, (C - 0.5) / SH_C0, groups)
    w = _lstsq(X, (C - 0.5) / SH_C0, ridge)  # [3, width + 1] -> DC colour
    out = gs.out_layer
    for k in range(K):  # every Gaussian of a voxel starts with the voxel's colour
        rows = slice(3 * K + 3 * k, 3 * K + 3 * k + 3)
        out.weight[rows] = w[:, :-1].to(out.weight.dtype)
        out.bias[rows] = w[:, -1].to(out.bias.dtype)
    inv_softplus = lambda x: math.log(math.expm1(x))  # noqa: E731
    best = (float("inf"), None)
    for sc in scales:
        for op in opacities:
            out.bias[6 * K: 9 * K] = inv_softplus(cfg.scaling_bias * sc) - inv_softplus(cfg.scaling_bias)
            out.bias[13 * K: 14 * K] = math.log(op / (1 - op)) - math.log(cfg.opacity_bias / (1 - cfg.opacity_bias))
            err = 0.0
            for a, (rec, coords) in zip(assets, per_asset):
                V, H, W, _ = a["views"].shape
                r = gs.render(gs(rec, coords), a["viewmats"], a["Ks"], W, H).rgb.clamp(0, 1)
                err += float((r - a["views"]).pow(2).mean())
            if err < best[0]:
                best = (err, (sc, op))
    sc, op = best[1]
    out.bias[6 * K: 9 * K] = inv_softplus(cfg.scaling_bias * sc) - inv_softplus(cfg.scaling_bias)
    out.bias[13 * K: 14 * K] = math.log(op / (1 - op)) - math.log(cfg.opacity_bias / (1 - cfg.opacity_bias))
    return {"voxels": len(F_), "colour_mse": float(((X @ w.T) * SH_C0 + 0.5 - C).pow(2).mean()),
            "ridge": ridge, "scale_fraction": sc, "opacity": op, "train_view_mse": best[0] / max(len(assets), 1)}
