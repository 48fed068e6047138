"""Official AToken checkpoints (apple/ml-atoken) <-> this project's model.

This model uses the official parameter names and numerics, so the mapping is the identity on names;
what this module adds is a strict check (every official tensor consumed, every model tensor filled,
shapes equal; otherwise an error listing the names), safe loading (`torch.load(weights_only=True)` or
safetensors, never full unpickling), the variant configs, and export back to the official naming.
"""
from __future__ import annotations

from pathlib import Path
import logging
from typing import Any

import torch

from atoken.config import ATokenConfig, preset
from atoken.gaussian import GaussianDecoder, GaussianDecoderConfig
from atoken.model import AToken

log = logging.getLogger(__name__)

# Model tensors that official checkpoints do not hold: the release hard-codes them in its init.
NOT_IN_OFFICIAL = {"logit_scale": 4.8438, "logit_bias": -15.5625}

VARIANTS = {
    "soc": dict(latent_channels=48),  # So/C, continuous (also the stage-2 checkpoint)
    "sod": dict(latent_channels=48, use_quantizer=True),  # So/D, FSQ 8 x 4096
    "soc-s1": dict(latent_channels=32),  # stage-1, image-only, latent 32
}
ALL_VARIANTS = sorted(VARIANTS) + ["3d-gs"]

GS_VARIANT = "3d-gs"  # the official 3D Gaussian decoder (3d_decode_gs.pt)
GS_PREFIX = "gs_decoder."  # where it lives inside this project's AToken
LPIPS_PREFIX = "lpips_loss."  # training-loss weights stored in the official GS checkpoint; not model weights

# official arch-config key -> ATokenConfig field (same names, listed to make the contract explicit)
_ARCH_KEYS = ["patch_size", "in_channels", "out_channels", "latent_channels"] + [
    f"{side}_{k}" for side in ("encoder", "decoder") for k in
    ("model_channels", "num_blocks", "num_heads", "mlp_channels", "use_bias", "use_rms_norm", "qk_rms_norm")]


def config_from_official_arch(arch: dict[str, Any]) -> ATokenConfig:
    """Builds a config from an official `arch_cfg` (YAML) dict."""
    for mode_key in ("encoder_attn_mode", "decoder_attn_mode"):
        if arch.get(mode_key, "full") != "full":
            raise ValueError(f"official config: {mode_key}={arch[mode_key]!r} is not supported (only 'full')")
    for pe_key in ("encoder_pe_mode", "decoder_pe_mode"):
        if arch.get(pe_key, "joint") != "joint":
            raise ValueError(f"official config: {pe_key}={arch[pe_key]!r} is not supported (only 'joint')")
    kw = {k: arch[k] for k in _ARCH_KEYS if k in arch}
    kw["patch_size"] = tuple(kw.get("patch_size", (4, 16, 16)))
    if arch.get("use_quantizer"):
        if arch.get("quantizer_type", "fsq") != "fsq":
            raise ValueError(f"official config: quantizer_type={arch['quantizer_type']!r} is not supported")
        size, books = int(arch.get("quantizer_codebook_size", 4096)), int(arch.get("quantizer_num_codebooks", 8))
        if size != 4 ** 6:
            raise ValueError(f"official config: quantizer_codebook_size={size} (only 4096 = levels [4]*6)")
        kw.update(use_quantizer=True, fsq_levels=(4,) * 6, fsq_num_codebooks=books)
    return ATokenConfig(preset="official", **kw).validate()


def variant_config(variant: str, base: str = "so400m") -> ATokenConfig:
    """The config of an official variant. The release's checkpoints are So400m (`base`); the same naming
    holds for every preset, so a smaller preset's checkpoint in the official format loads the same way."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {sorted(VARIANTS)}")
    return preset(base, **VARIANTS[variant])


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads .safetensors or a .pt/.pth with weights_only=True (never unpickles code)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"official checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{p}: not a state_dict of tensors")
    return obj


def check_keys(official: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> None:
    """Raises with the names of every missing, unexpected or mis-shaped tensor."""
    expected = {k: v for k, v in model_state.items() if k not in NOT_IN_OFFICIAL}
    missing = sorted(set(expected) - set(official))
    unexpected = sorted(set(official) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(official[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in set(official) & set(expected) if official[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from checkpoint ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"not used by the model ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise ValueError("official checkpoint does not match the model config; " + "; ".join(parts))


def load_official_gaussian_decoder(path: str | Path, config: dict | None = None):
    """The official 3D Gaussian decoder. Its checkpoint also holds LPIPS(VGG) loss weights under
    `lpips_loss.*`; they are not model weights and are skipped (and reported)."""
    state = read_state_dict(path)
    skipped = sorted(k for k in state if k.startswith(LPIPS_PREFIX))
    state = {k: v for k, v in state.items() if not k.startswith(LPIPS_PREFIX)}
    dec = GaussianDecoder(GaussianDecoderConfig(**(config or {})))
    own = dec.state_dict()
    check_keys(state, own)
    dec.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    if skipped:
        log.info("%s: skipped %d LPIPS loss tensors (%s*); they are not model weights", path, len(skipped), LPIPS_PREFIX)
    dec.skipped_keys = skipped
    return dec


def load_official(path: str | Path, variant: str = "soc", config: ATokenConfig | None = None):
    if variant == GS_VARIANT:
        return load_official_gaussian_decoder(path, (config.gaussian_decoder if config else None))
    cfg = config or variant_config(variant)
    state = read_state_dict(path)
    model = AToken(cfg)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(GS_PREFIX)}
    check_keys(state, own)
    full = {k: v.to(own[k].dtype) for k, v in state.items()}
    for k, v in NOT_IN_OFFICIAL.items():
        full[k] = torch.full(own[k].shape, v, dtype=own[k].dtype)
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if not k.startswith(GS_PREFIX)]:
        raise ValueError(f"official load: missing {missing}, unexpected {unexpected}")
    return model


def to_official_state_dict(model) -> dict[str, torch.Tensor]:
    """The autoencoder's weights in the official naming (drops the non-checkpoint logit scale/bias and
    the Gaussian decoder, which the release ships as its own file)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k not in NOT_IN_OFFICIAL and not k.startswith(GS_PREFIX)}


def to_official_gaussian_state_dict(model) -> dict[str, torch.Tensor]:
    """The Gaussian decoder's weights in the official (root-level) naming, without LPIPS weights."""
    return {k[len(GS_PREFIX):]: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.startswith(GS_PREFIX)}


def convert_official(src: str | Path, dst: str | Path, variant: str = "soc", to_official: bool = False) -> Path:
    """`atoken convert-official`: official file -> save_pretrained dir, or (--to-official) a
    save_pretrained dir -> an official-named .safetensors / .pt file."""
    dst = Path(dst)
    if to_official:
        if variant == GS_VARIANT:
            src_p = Path(src)
            if (src_p / "gaussian_decoder.json").is_file():
                state = {k: v.contiguous() for k, v in GaussianDecoder.from_pretrained(src_p).state_dict().items()}
            else:
                model = AToken.from_pretrained(src)
                if model.gs_decoder is None:
                    raise ValueError(f"{src}: the model has no Gaussian decoder to export")
                state = to_official_gaussian_state_dict(model)
        else:
            state = to_official_state_dict(AToken.from_pretrained(src))
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(dst))
        else:
            torch.save(state, str(dst))
        log.info("wrote %d tensors in official naming to %s", len(state), dst)
        return dst
    if variant == GS_VARIANT:
        load_official_gaussian_decoder(src).save_pretrained(dst)
        log.info("converted %s (%s) -> %s (attach with AToken.attach_gaussian_decoder)", src, variant, dst)
        return dst
    model = load_official(src, variant)
    model.save_pretrained(dst, metadata={"source": str(src), "variant": variant})
    log.info("converted %s (%s) -> %s", src, variant, dst)
    return dst
