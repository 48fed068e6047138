"""The export component: a stage's consolidated EMA weights in `save_pretrained` form.

`<run>/export/`: model.safetensors + config.json (the tokenizer), text_projection.safetensors (the map
from the text tower's space into the semantic head's), text_tower.json (which tower). The EMA shards of
every rank are swapped in, each ZeRO-3 parameter is gathered in turn, and rank 0 writes the files.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch

from atoken.model import AToken
from preprocess import storage
from trainers.config import TrainConfig

TEXT_PROJECTION = "text_projection.safetensors"
TEXT_TOWER = "text_tower.json"
FILES = ("config.json", "model.safetensors", TEXT_PROJECTION, TEXT_TOWER)


def export_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name, "export")


def write_export(model: AToken, text_projection: torch.Tensor | None, out: str, text_tower: dict,
                 metadata: dict | None = None) -> None:
    """save_pretrained + the text projection, committed file by file to `out` (local or s3://)."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="atoken-export-") as d:
        model.save_pretrained(d, metadata=metadata)
        if text_projection is not None:
            save_file({"weight": text_projection.contiguous()}, os.path.join(d, TEXT_PROJECTION))
        Path(d, TEXT_TOWER).write_text(json.dumps(text_tower))
        for f in sorted(os.listdir(d)):
            storage.commit_file(os.path.join(d, f), storage.join(out, f))


def read_text_projection(directory: str) -> torch.Tensor | None:
    from safetensors.torch import load_file

    uri = storage.join(directory, TEXT_PROJECTION)
    if not storage.exists(uri):
        return None
    with storage.local_path(uri) as p:
        return load_file(p)["weight"]


def export_ema(engine, ema, module, cfg: TrainConfig, rank: int) -> None:
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    with ema.swapped_in():
        for name, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    state[name] = p.data.detach().float().cpu().clone()
    if rank != 0:
        return
    for name, b in engine.module.named_buffers():
        state.setdefault(name, b.detach().cpu().clone())
    model = AToken(copy.deepcopy(module.model.config))  # the live module holds ZeRO-3 placeholders
    want = model.state_dict()
    own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and k[len("model."):] in want}
    missing = sorted(set(want) - set(own))
    if missing:
        raise RuntimeError(f"export: gathered state lacks {missing}")
    model.load_state_dict(own, strict=True)
    write_export(model, state["text_proj.weight"], export_dir(cfg),
                 {"tower": cfg.losses.text_tower, "path": cfg.losses.text_path},
                 metadata={"stage": cfg.stage, "steps": cfg.steps, "ema_decay": cfg.optim.ema_decay})


def load_export(directory: str) -> tuple[AToken, torch.Tensor | None, dict]:
    """(model, text projection or None, text tower settings) from an export folder (local or s3://)."""
    d = Path(tempfile.mkdtemp(prefix="atoken-export-"))
    for f in FILES:
        uri = storage.join(directory, f)
        if storage.exists(uri):
            with storage.local_path(uri) as p:
                (d / f).write_bytes(Path(p).read_bytes())
    model = AToken.from_pretrained(d)
    proj = None
    if (d / TEXT_PROJECTION).exists():
        from safetensors.torch import load_file

        proj = load_file(str(d / TEXT_PROJECTION))["weight"]
    tower = json.loads((d / TEXT_TOWER).read_text()) if (d / TEXT_TOWER).exists() else {"tower": "minilm", "path": ""}
    return model, proj, tower
