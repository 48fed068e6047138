"""Typed model configuration and presets.

Field names follow the official release's arch config (`encoder_model_channels`, ...), so an official
config maps onto this one key for key. Validation names the bad key.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoken.gaussian import GaussianDecoderConfig


@dataclass
class ATokenConfig:
    patch_size: tuple[int, int, int] = (4, 16, 16)
    in_channels: int = 3072
    out_channels: int = 3072
    latent_channels: int = 48

    encoder_model_channels: int = 1152
    encoder_num_blocks: int = 27
    encoder_num_heads: int = 16
    encoder_mlp_channels: int = 4304
    encoder_use_bias: bool = True
    encoder_use_rms_norm: bool = False
    encoder_qk_rms_norm: bool = False

    decoder_model_channels: int = 1152
    decoder_num_blocks: int = 27
    decoder_num_heads: int = 16
    decoder_mlp_channels: int = 4304
    decoder_use_bias: bool = False
    decoder_use_rms_norm: bool = True
    decoder_qk_rms_norm: bool = True

    pos_grid: int = 16  # learned 2D table is pos_grid x pos_grid, resized per sample
    rope_theta: float = 10000.0
    temporal_window: int = 4  # latent steps per window (16 frames); windows never attend to each other
    norm_eps: float = 1e-6

    use_quantizer: bool = False  # FSQ discrete tokens (stage 4 / So/D)
    fsq_levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
    fsq_num_codebooks: int = 8

    logit_scale_init: float = 4.8438  # SigLIP-style sigmoid similarity (official hard-coded values)
    logit_bias_init: float = -15.5625

    # 3D Gaussian decoder (GaussianDecoderConfig fields); None: the model has none
    gaussian_decoder: dict | None = None
    gradient_checkpointing: bool = False
    preset: str = "custom"

    @property
    def patch_dim(self) -> int:
        t, p, q = self.patch_size
        return t * p * q * 3

    def validate(self) -> "ATokenConfig":
        def bad(key: str, why: str) -> None:
            raise ValueError(f"model config: {key}={getattr(self, key)!r}: {why}")

        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            bad("patch_size", "must be three positive ints (t, h, w)")
        if self.in_channels != self.patch_dim:
            bad("in_channels", f"must equal t*h*w*3 = {self.patch_dim} for patch_size {self.patch_size}")
        if self.out_channels != self.patch_dim:
            bad("out_channels", f"must equal t*h*w*3 = {self.patch_dim}")
        for side in ("encoder", "decoder"):
            width, heads = getattr(self, f"{side}_model_channels"), getattr(self, f"{side}_num_heads")
            if heads < 1 or width % heads:
                bad(f"{side}_num_heads", f"must divide {side}_model_channels={width}")
            elif (width // heads) % 8:
                bad(f"{side}_num_heads", f"head dim {width // heads} must be divisible by 8 (4-axis RoPE)")
            for k in ("num_blocks", "mlp_channels"):
                if getattr(self, f"{side}_{k}") < 1:
                    bad(f"{side}_{k}", "must be >= 1")
        if self.use_quantizer:
            dims = len(self.fsq_levels) * self.fsq_num_codebooks
            if dims != self.latent_channels:
                bad("fsq_num_codebooks", f"codebooks x len(fsq_levels) = {dims} must equal latent_channels")
        if self.latent_channels < 1:
            bad("latent_channels", "must be >= 1")
        if self.temporal_window < 1:
            bad("temporal_window", "must be >= 1")
        if self.gaussian_decoder is not None:
            known = set(GaussianDecoderConfig.__dataclass_fields__)
            extra = sorted(set(self.gaussian_decoder) - known)
            if extra:
                bad("gaussian_decoder", f"unknown keys {extra}")
            GaussianDecoderConfig(**self.gaussian_decoder).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"], d["fsq_levels"] = list(self.patch_size), list(self.fsq_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ATokenConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}")
        d = dict(d)
        for k in ("patch_size", "fsq_levels"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "ATokenConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _preset(name: str, width: int, blocks: int, heads: int, mlp: int, **kw: Any) -> ATokenConfig:
    base = dict(encoder_model_channels=width, encoder_num_blocks=blocks, encoder_num_heads=heads,
                encoder_mlp_channels=mlp, decoder_model_channels=width, decoder_num_blocks=blocks,
                decoder_num_heads=heads, decoder_mlp_channels=mlp, preset=name)
    unknown = sorted(set(kw) - set(ATokenConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"model config: unknown keys {unknown}")
    return ATokenConfig(**{**base, **kw}).validate()


# the tiny preset's 3D head; its grid (resolution) and size constants follow the shards' voxel grid when a
# stage attaches it (trainers.start.gaussian_decoder_for_grid)
TINY_GAUSSIAN_DECODER = dict(model_channels=64, num_blocks=1, num_heads=2, mlp_channels=128, gaussians_per_voxel=4,
                             resolution=16)

PRESETS = {
    # trains on 2 CPU cores in minutes
    "tiny": lambda **kw: _preset("tiny", 96, 2, 2, 256, **{"gaussian_decoder": TINY_GAUSSIAN_DECODER, **kw}),
    # SigLIP2-Base-sized: 12 blocks, 768 wide, 12 heads (~192M encoder + decoder in the paper)
    "base": lambda **kw: _preset("base", 768, 12, 12, 3072, **kw),
    # SigLIP2 So400m: 27 blocks, 1152 wide, 16 heads, MLP 4304 (~800M in the paper)
    "so400m": lambda **kw: _preset("so400m", 1152, 27, 16, 4304, **kw),
}


def preset(name: str, **overrides: Any) -> ATokenConfig:
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


__all__ = ["ATokenConfig", "PRESETS", "preset", "field"]
