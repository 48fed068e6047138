"""AToken: one transformer tokenizer for images, videos and 3D assets on packed sparse 4D tokens."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from atoken.bottleneck import FSQ, DiagonalGaussian
from atoken.config import ATokenConfig
from atoken.gaussian import GaussianDecoder, GaussianDecoderConfig
from atoken.patchify import pack, tokens_to_video, unpack
from atoken.sparse import SparseBatch
from atoken.transformer import Decoder, Encoder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class EncodeOutput:
    tokens: torch.Tensor  # [L, C] encoder output (post-norm)
    posterior: DiagonalGaussian  # KL mean / logvar [L, latent]
    semantic: torch.Tensor  # [B, C] L2-normalised pooled embedding
    semantic_raw: torch.Tensor  # [B, C] before normalisation


class AToken(nn.Module):
    """Encoder (SigLIP2-like) -> KL projection (-> FSQ) -> decoder, plus a pooled semantic head.

    Parameter names equal the official release's, so official state_dicts load directly.
    """

    def __init__(self, config: ATokenConfig):
        super().__init__()
        self.config = config.validate()
        self.encoder = Encoder(config)
        self.proj = nn.Linear(config.encoder_model_channels, 2 * config.latent_channels, bias=False)
        self.decoder = Decoder(config)
        self.quantizer = FSQ(config.fsq_levels, config.fsq_num_codebooks) if config.use_quantizer else None
        self.gs_decoder = None
        if config.gaussian_decoder is not None:
            self.gs_decoder = GaussianDecoder(GaussianDecoderConfig(**config.gaussian_decoder))
        # Not in official checkpoints (hard-coded there); trainable here for the sigmoid text loss.
        # shape [1], not 0-d: DeepSpeed's parameter broadcast cannot view 0-d tensors as bytes
        self.logit_scale = nn.Parameter(torch.tensor([config.logit_scale_init]))
        self.logit_bias = nn.Parameter(torch.tensor([config.logit_bias_init]))

    # ---------------------------------------------------------------- packed-token level
    def encode_sparse(self, batch: SparseBatch, capture: dict | None = None) -> EncodeOutput:
        tokens = self.encoder(batch.feats, batch.coords, capture)
        raw = self.encoder.pool(tokens, batch.offsets.tolist())
        return EncodeOutput(tokens, DiagonalGaussian(self.proj(tokens)), F.normalize(raw, dim=-1), raw)

    def bottleneck(self, enc: EncodeOutput, sample: bool = False,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents the decoder consumes, and FSQ codes when quantising (FSQ reads the KL mean)."""
        if self.quantizer is not None:
            return self.quantizer(enc.posterior.mean)
        return (enc.posterior.sample(generator) if sample else enc.posterior.mode()), None

    def decode_sparse(self, latent: torch.Tensor, coords: torch.Tensor, capture: dict | None = None,
                      out_features: int | None = None) -> torch.Tensor:
        return self.decoder(latent, coords, capture, out_features)

    def forward(self, batch: SparseBatch, sample: bool = True, generator: torch.Generator | None = None) -> dict:
        enc = self.encode_sparse(batch)
        latent, codes = self.bottleneck(enc, sample, generator)
        width = batch.feats.shape[1]  # a batch packed with trim_padding: its tokens' first frame only
        rec = self.decode_sparse(latent, batch.coords, out_features=width if width < self.config.in_channels else None)
        return {"rec": rec, "latent": latent, "codes": codes, "posterior": enc.posterior,
                "semantic": enc.semantic, "tokens": enc.tokens}

    # ---------------------------------------------------------------- user level
    def pack(self, samples: list[tuple[str, torch.Tensor]]) -> SparseBatch:
        return pack(samples, self.config.patch_size, self.config.in_channels)

    @torch.no_grad()
    def encode(self, samples: list[tuple[str, torch.Tensor]], codes: bool = False) -> tuple[torch.Tensor, SparseBatch]:
        """Samples -> (latents [L, latent] or FSQ codes [L, G], the packed batch for decoding).

        image [H,W,3] / video [T,H,W,3] in [-1, 1]; 3d as (voxel_feats [N,768] in [0,1], coords [N,3]).
        """
        if codes and self.quantizer is None:
            raise ValueError("encode(codes=True) needs a model with use_quantizer=True (FSQ)")
        dev = next(self.parameters()).device
        batch = self.pack(samples).to(dev)
        latent, c = self.bottleneck(self.encode_sparse(batch))
        return (c if codes else latent), batch

    @torch.no_grad()
    def decode(self, latents_or_codes: torch.Tensor, batch: SparseBatch) -> list[torch.Tensor]:
        """-> per-sample pixels [T, H, W, 3] in [-1, 1] (images T=1) or 3D voxel patches [N, 768]."""
        z = latents_or_codes
        if not torch.is_floating_point(z):
            if self.quantizer is None:
                raise ValueError("integer codes given to a model without an FSQ quantizer")
            z = self.quantizer.codes_to_latents(z)
        return unpack(batch, self.decode_sparse(z, batch.coords), self.config.patch_size)

    @torch.no_grad()
    def decode_video_stream(self, latents: torch.Tensor, coords: torch.Tensor, kv_cache_frames: int = 0):
        """Long video: yields decoded frames [16, H, W, 3] in [-1, 1] tile by tile (temporal tiling with
        a K/V cache across tiles); peak memory is that of one tile, whatever the video's length."""
        pt, ph, pw = self.config.patch_size
        for rec, c in self.decoder.stream(latents, coords, kv_cache_frames):
            H, W = (int(c[:, 2].max()) + 1) * ph, (int(c[:, 3].max()) + 1) * pw
            nt = int(c[:, 1].max() - c[:, 1].min()) + 1
            yield tokens_to_video(rec, c, (nt * pt, H, W), self.config.patch_size)

    # ---------------------------------------------------------------- curriculum transitions
    @torch.no_grad()
    def grow_latent(self, channels: int) -> "AToken":
        """Widens the KL latent (stage 1 -> 2: 32 -> 48). New mean and logvar rows and the decoder's new
        input columns start at zero, so the reconstruction is unchanged at the switch."""
        old = self.config.latent_channels
        if channels < old:
            raise ValueError(f"grow_latent: {channels} < current latent_channels {old}")
        if channels == old:
            return self
        w = self.proj.weight
        proj = nn.Linear(w.shape[1], 2 * channels, bias=False).to(w.device, w.dtype)
        proj.weight.zero_()
        proj.weight[:old] = w[:old]
        proj.weight[channels:channels + old] = w[old:]
        self.proj = proj
        inp = self.decoder.input_layer
        new_in = nn.Linear(channels, inp.out_features, bias=inp.bias is not None).to(w.device, w.dtype)
        new_in.weight.zero_()
        new_in.weight[:, :old] = inp.weight
        if inp.bias is not None:
            new_in.bias.copy_(inp.bias)
        self.decoder.input_layer = new_in
        self.config.latent_channels = channels
        return self

    def attach_gaussian_decoder(self, decoder) -> "AToken":
        """Adds a (e.g. official, converted) 3D Gaussian decoder; it is saved with the model from then on."""
        self.gs_decoder = decoder
        self.config.gaussian_decoder = dict(decoder.cfg.__dict__)
        return self

    def enable_fsq(self) -> "AToken":
        """Stage 4: quantise the 48-d KL mean with FSQ (no new parameters)."""
        self.config.use_quantizer = True
        self.config.validate()
        self.quantizer = FSQ(self.config.fsq_levels, self.config.fsq_num_codebooks).to(self.proj.weight.device)
        return self

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Writes model.safetensors + config.json (no pickles)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE), metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
        self.config.save(d / CONFIG_FILE)
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "AToken":
        d = Path(directory)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if not (d / f).is_file():
                raise FileNotFoundError(f"{d}: missing {f} (expected a save_pretrained directory)")
        model = cls(ATokenConfig.load(d / CONFIG_FILE))
        model.load_state_dict(load_file(str(d / WEIGHTS_FILE), device=str(device)), strict=True)
        return model.to(device)

    def num_parameters(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"encoder": count(self.encoder), "proj": count(self.proj), "decoder": count(self.decoder),
                "total": count(self)}
