"""SigLIP2 (So400m/16 NaFlex in production) from a local Hugging Face directory: encoder
initialisation, vision teacher / feature network, and text tower. Never downloads.

Encoder initialisation generalises SigLIP2's 16x16 patch embedding to 4x16x16: the pretrained weights
fill the frame-0 slot (input columns 0..767) and the temporal slots are zero, so an image (zero-padded
in time) gets exactly SigLIP2's patch features at the start of training.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from atoken.config import ATokenConfig, preset
from atoken.model import AToken


def load_siglip2(path: str | Path, setting: str):
    """-> (Siglip2Model or vision/text model, processor or None). `setting` names the config key."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{setting}={p}: not a local Hugging Face SigLIP2 directory (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoProcessor

    cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    model = AutoModel.from_pretrained(str(p), local_files_only=True, config=cfg).eval()
    try:
        processor = AutoProcessor.from_pretrained(str(p), local_files_only=True)
    except Exception:
        processor = None
    return model, processor


def _vision_state(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def siglip2_to_encoder_state(vision: dict[str, torch.Tensor], num_blocks: int, patch_dim: int) -> dict[str, torch.Tensor]:
    """Maps HF Siglip2 vision weights onto `encoder.*` names of this model (official layout)."""
    out: dict[str, torch.Tensor] = {}
    w = vision["embeddings.patch_embedding.weight"]  # [C, 16*16*3], (ph pw c) order
    out["encoder.input_layer.weight"] = torch.cat([w, w.new_zeros(w.shape[0], patch_dim - w.shape[1])], 1)
    out["encoder.input_layer.bias"] = vision["embeddings.patch_embedding.bias"]
    out["encoder.pos_embedder.position_embedding.weight"] = vision["embeddings.position_embedding.weight"]
    for i in range(num_blocks):
        s, d = f"encoder.layers.{i}.", f"encoder.blocks.{i}."
        for a, b in (("layer_norm1", "norm1"), ("layer_norm2", "norm2")):
            out[d + b + ".weight"], out[d + b + ".bias"] = vision[s + a + ".weight"], vision[s + a + ".bias"]
        for kind in ("weight", "bias"):
            out[d + "attn.to_qkv." + kind] = torch.cat([vision[s + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            out[d + "attn.to_out." + kind] = vision[s + f"self_attn.out_proj.{kind}"]
            out[d + "mlp.mlp.0." + kind] = vision[s + f"mlp.fc1.{kind}"]
            out[d + "mlp.mlp.2." + kind] = vision[s + f"mlp.fc2.{kind}"]
    C = w.shape[0]
    for kind in ("weight", "bias"):
        out[f"encoder.post_layernorm.{kind}"] = vision[f"post_layernorm.{kind}"]
        inp = vision[f"head.attention.in_proj_{kind}"]
        out[f"encoder.head.attention.to_q.{kind}"], out[f"encoder.head.attention.to_kv.{kind}"] = inp[:C], inp[C:]
        out[f"encoder.head.attention.to_out.{kind}"] = vision[f"head.attention.out_proj.{kind}"]
        out[f"encoder.head.layernorm.{kind}"] = vision[f"head.layernorm.{kind}"]
        out[f"encoder.head.mlp.mlp.0.{kind}"] = vision[f"head.mlp.fc1.{kind}"]
        out[f"encoder.head.mlp.mlp.2.{kind}"] = vision[f"head.mlp.fc2.{kind}"]
    out["encoder.head.probe"] = vision["head.probe"].reshape(-1)
    return out


def init_encoder_from_siglip2(directory: str | Path, config: ATokenConfig | None = None):
    """AToken whose encoder (and semantic head) come from a local SigLIP2 checkpoint."""
    model_hf, _ = load_siglip2(directory, "model.siglip2_path")
    vcfg = getattr(model_hf.config, "vision_config", model_hf.config)
    cfg = config or preset("so400m")
    want = dict(encoder_model_channels=vcfg.hidden_size, encoder_num_blocks=vcfg.num_hidden_layers,
                encoder_num_heads=vcfg.num_attention_heads, encoder_mlp_channels=vcfg.intermediate_size)
    for k, v in want.items():
        if getattr(cfg, k) != v:
            raise ValueError(f"model config: {k}={getattr(cfg, k)} but the SigLIP2 checkpoint at {directory} has {v}")
    model = AToken(cfg)
    state = siglip2_to_encoder_state(_vision_state(model_hf), cfg.encoder_num_blocks, cfg.in_channels)
    missing, unexpected = model.load_state_dict(state, strict=False)
    enc_missing = [k for k in missing if k.startswith("encoder.")]
    if enc_missing or unexpected:
        raise ValueError(f"SigLIP2 mapping incomplete: missing {enc_missing}, unexpected {unexpected}")
    return model


class SigLIP2Vision(nn.Module):
    """SigLIP2 vision tower as a frozen feature network / distillation teacher (fixed-grid input)."""

    def __init__(self, path: str | Path):
        super().__init__()
        model, _ = load_siglip2(path, "losses.feature_network_path")
        self.vision = getattr(model, "vision_model", model)
        self.embed_dim = self.vision.config.hidden_size
        self.patch = self.vision.config.patch_size

    def taps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x normalised to [-1, 1], [N, 3, H, W] -> (hidden states as maps, pooled embedding)."""
        N, _, H, W = x.shape
        p = self.patch
        gh, gw = H // p, W // p
        patches = x[:, :, : gh * p, : gw * p].reshape(N, 3, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(N, gh * gw, p * p * 3)
        mask = torch.ones(N, gh * gw, dtype=torch.long, device=x.device)
        shapes = torch.tensor([[gh, gw]] * N, device=x.device)
        out = self.vision(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes,
                          output_hidden_states=True)
        maps = [h.transpose(1, 2).reshape(N, -1, gh, gw) for h in out.hidden_states[1::4]]
        return maps, F.normalize(out.pooler_output, dim=-1)


class SigLIP2Teacher(nn.Module):
    """Frozen SigLIP2 (vision and text towers of one checkpoint) as the distillation teacher: image-text
    similarities in its own space (paper §3.3: KL(softmax(s_teacher/τ) ‖ softmax(s_student/τ)) over the
    texts, both against the same frozen text encoder). Text goes through the checkpoint's tokenizer,
    lowercased, padded to 64 tokens as SigLIP2 was trained."""

    def __init__(self, path: str | Path):
        super().__init__()
        from transformers import AutoTokenizer

        model, _ = load_siglip2(path, "losses.teacher_path")
        if not hasattr(model, "get_text_features") or not hasattr(model, "vision_model"):
            raise ValueError(f"losses.teacher_path={path}: needs a full SigLIP2 checkpoint (vision and text towers)")
        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.patch = model.config.vision_config.patch_size
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "SigLIP2Teacher":
        return super().train(False)

    @torch.no_grad()
    def text_embed(self, texts: list[str]) -> torch.Tensor:
        t = self.tokenizer([x.lower() for x in texts], padding="max_length", max_length=64, truncation=True,
                           return_tensors="pt")
        out = self.model.get_text_features(input_ids=t["input_ids"].to(self.model.device))
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def image_embed(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images [H, W, 3] in [-1, 1] (any sizes) -> [N, D], one NaFlex pass each."""
        out = []
        p = self.patch
        for x in images:
            gh, gw = x.shape[0] // p, x.shape[1] // p
            patches = x[: gh * p, : gw * p].reshape(gh, p, gw, p, 3).permute(0, 2, 1, 3, 4).reshape(1, gh * gw, -1)
            feats = self.model.get_image_features(
                pixel_values=patches.to(self.model.device, torch.float32),
                pixel_attention_mask=torch.ones(1, gh * gw, dtype=torch.long, device=self.model.device),
                spatial_shapes=torch.tensor([[gh, gw]], device=self.model.device))
            out.append(getattr(feats, "pooler_output", feats)[0])
        return F.normalize(torch.stack(out).float(), dim=-1)

    def similarities(self, images: list[torch.Tensor], texts: list[str]) -> torch.Tensor:
        """[N_images, N_texts] logits in the teacher's space (its learned scale and bias)."""
        s = self.image_embed(images) @ self.text_embed(texts).T
        scale = self.model.logit_scale.exp() if hasattr(self.model, "logit_scale") else 1.0
        bias = self.model.logit_bias if hasattr(self.model, "logit_bias") else 0.0
        return s * scale + bias
