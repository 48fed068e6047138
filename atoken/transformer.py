"""Encoder and decoder transformers over packed tokens with windowed, block-diagonal attention."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from atoken.config import ATokenConfig
from atoken.layers import (AttentionPoolingHead, LayerNorm32, LearnedPositionEmbedder, RMSNorm32,
                           RotaryEmbedding4D, TransformerBlock, TrimmableLinear, make_norm)
from atoken.sparse import Segments, segments


class _Stack(nn.Module):
    """input_layer -> + learned 2D position -> blocks (4D RoPE) -> final norm, per attention segment."""

    def __init__(self, cfg: ATokenConfig, side: str, in_dim: int, in_bias: bool):
        super().__init__()
        g = lambda k: getattr(cfg, f"{side}_{k}")  # noqa: E731
        width, heads = g("model_channels"), g("num_heads")
        self.window = cfg.temporal_window
        self.checkpointing = cfg.gradient_checkpointing
        self.input_layer = TrimmableLinear(in_dim, width, bias=in_bias)
        self.pos_embedder = LearnedPositionEmbedder(width, cfg.pos_grid)
        self.rope = RotaryEmbedding4D(width // heads, cfg.rope_theta)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, g("mlp_channels"), g("use_bias"), g("use_rms_norm"), g("qk_rms_norm"),
                             cfg.norm_eps) for _ in range(g("num_blocks")))

    def run(self, x: torch.Tensor, coords: torch.Tensor, capture: dict | None) -> tuple[torch.Tensor, Segments]:
        seg = segments(coords, self.window)
        x = x if seg.inverse is None else x[seg.order]
        unsort = (lambda t: t) if seg.inverse is None else (lambda t: t[seg.inverse])  # noqa: E731
        h = self.input_layer(x)
        pe = self.pos_embedder(seg.pos, seg.cu, seg.grid)
        if capture is not None:
            capture["input_proj"], capture["pos_embed"] = unsort(h), unsort(pe)
            capture["rope_positions"] = unsort(seg.pos)
        h = h + pe
        rot = self.rope.angles(seg.pos)
        for i, block in enumerate(self.blocks):
            if self.checkpointing and self.training:
                h = checkpoint(block, h, rot, seg.cu, use_reentrant=False)
            else:
                h = block(h, rot, seg.cu)
            if capture is not None:
                capture[f"block{i}"] = unsort(h)
        return unsort(h), seg


class Encoder(_Stack):
    def __init__(self, cfg: ATokenConfig):
        super().__init__(cfg, "encoder", cfg.in_channels, cfg.encoder_use_bias)
        w = cfg.encoder_model_channels
        self.post_layernorm = make_norm(w, cfg.encoder_use_rms_norm, cfg.norm_eps)
        self.head = AttentionPoolingHead(w, cfg.encoder_num_heads, cfg.encoder_mlp_channels, cfg.norm_eps)

    def forward(self, feats: torch.Tensor, coords: torch.Tensor, capture: dict | None = None) -> torch.Tensor:
        h, _ = self.run(feats, coords, capture)
        return self.post_layernorm(h)

    def pool(self, tokens: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        return self.head(tokens, offsets)


class Decoder(_Stack):
    def __init__(self, cfg: ATokenConfig):
        super().__init__(cfg, "decoder", cfg.latent_channels, False)
        w = cfg.decoder_model_channels
        self.out_norm = make_norm(w, cfg.decoder_use_rms_norm, cfg.norm_eps)
        self.out_layer = TrimmableLinear(w, cfg.out_channels, bias=cfg.decoder_use_bias)

    def forward(self, latent: torch.Tensor, coords: torch.Tensor, capture: dict | None = None,
                out_features: int | None = None) -> torch.Tensor:
        """Reconstructed tokens [L, out_features or out_channels] (the leading channels: frame 0 first)."""
        h, _ = self.run(latent, coords, capture)
        return self.out_layer(self.out_norm(h), out_features)

    @torch.no_grad()
    def stream(self, latent: torch.Tensor, coords: torch.Tensor, kv_cache_frames: int = 0):
        """Decodes one sample's tokens tile by tile (tile = temporal_window latent frames), each tile
        attending to the last `kv_cache_frames` latent frames of the previous tile through a K/V cache.
        Yields (rec_tokens, coords) per tile, so memory does not grow with the video's length.
        With kv_cache_frames=0 this equals forward() exactly (the windows are independent)."""
        if kv_cache_frames >= self.window:
            raise ValueError(f"kv_cache_frames={kv_cache_frames} must be < the tile of {self.window} latent frames")
        if len(coords) and int(coords[:, 0].max()) != int(coords[:, 0].min()):
            raise ValueError("Decoder.stream decodes one sample at a time")
        t = coords[:, 1].long()
        caches: list = [None] * len(self.blocks)
        for start in range(int(t.min()), int(t.max()) + 1, self.window):
            m = (t >= start) & (t < start + self.window)
            c = coords[m]
            pos = c[:, 1:].long().clone()
            pos[:, 0] -= start
            grid = (int(pos[:, 1].max()) + 1, int(pos[:, 2].max()) + 1)
            h = self.input_layer(latent[m]) + self.pos_embedder(pos, [0, len(pos)], [grid])
            for i, block in enumerate(self.blocks):
                h, kv = block.forward_cached(h, pos, self.rope, caches[i])
                caches[i] = kv.keep_last(kv_cache_frames, self.window)
            yield self.out_layer(self.out_norm(h)), c


__all__ = ["Encoder", "Decoder", "LayerNorm32", "RMSNorm32"]
