"""The start component: a stage's starting model, prepared once before its workers start.

From its source (the previous stage's export, an official checkpoint, a SigLIP2 directory or a fresh
preset) through the stage's transitions (data-dependent fresh init, latent growth, FSQ switch, a Gaussian
decoder on the grid the voxels come from) to `<run>/start/`: an export folder every worker loads, plus
the text embeddings of every training caption (`captions.safetensors`), so that no worker loads the
text tower. Written once per run folder; a resumed or restarted stage reuses it. `start.json` records
what each transition did (PCA explained variance, growth method, FSQ fit), for the stage's run in MLflow.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from atoken.config import preset
from atoken.gaussian import GaussianDecoder, GaussianDecoderConfig
from atoken.init import (fresh_sigmoid_init, fsq_switch_from_data, gaussian_decoder_init, grow_latent_from_data,
                         linear_path_init, standard_init)
from atoken.model import AToken
from atoken.official import load_official, variant_config
from atoken.siglip2 import init_encoder_from_siglip2
from pipelines.reader import iter_rows
from preprocess import storage
from trainers.config import TASK_MODALITY, TrainConfig
from trainers.data import row_to_sample
from trainers.export import load_export, write_export

START = "start"
INFO = "start.json"
CAPTIONS = "captions.safetensors"
CAPTION_LIST = "captions.json"


def start_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name, START)


def init_samples(cfg: TrainConfig, modalities: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
    """Up to init.max_items training items per modality that reconstruction trains on (datasets with a
    reconstruction weight of 0 left out), in index order (the same on every machine)."""
    out = []
    weights = cfg.data.rec_dataset_weights
    for mod in modalities:
        rows = (r for r in iter_rows(cfg.data.shards, modality=mod, split="train")
                if weights.get(r.get("dataset") or "", 1.0) > 0)
        for i, row in enumerate(rows):
            if i >= cfg.init.max_items:
                break
            s = row_to_sample(row, cfg.data.max_tokens_per_sample)
            out.append((s.modality, s.data))
    return out


def init_assets(cfg: TrainConfig) -> list[dict]:
    """The 3D training assets for the Gaussian decoder's start: voxel patches, voxels, views, cameras."""
    out = []
    for i, row in enumerate(iter_rows(cfg.data.shards, modality="3d", split="train")):
        if i >= cfg.init.max_items:
            break
        s = row_to_sample(row, cfg.data.max_tokens_per_sample)
        out.append({"voxel_feats": s.data[0], "voxels": s.data[1], "views": s.views["rgb"],
                    "viewmats": s.views["viewmats"], "Ks": s.views["Ks"], "grid": s.views["grid"]})
    return out


def shard_grid(shards: str) -> int | None:
    for row in iter_rows(shards, modality="3d", split="train"):
        return int(row["grid"])
    return None


def gaussian_decoder_for_grid(base: dict | None, grid: int) -> GaussianDecoder:
    """A fresh Gaussian decoder whose positions live on the voxels' grid, with the size constants the
    release uses at 64^3 and 32 Gaussians per voxel scaled to this grid and count (a Gaussian's scale
    follows the voxel size)."""
    d = dict(base or {})
    k = d.get("gaussians_per_voxel", GaussianDecoderConfig.gaussians_per_voxel)
    size = (64 / grid) * (32 / k) ** (1 / 3)
    d.update(resolution=grid, scaling_bias=GaussianDecoderConfig.scaling_bias * size,
             filter_3d=GaussianDecoderConfig.filter_3d * 64 / grid)
    return GaussianDecoder(GaussianDecoderConfig(**d))


def source_model(cfg: TrainConfig) -> tuple[AToken, torch.Tensor | None, dict]:
    """The model the stage starts from, before its transitions, and what was done to it."""
    m = cfg.model
    if m.init_from:
        model, proj, _ = load_export(m.init_from)
        return model, proj, {"source": m.init_from}
    if m.init_official:
        with storage.local_path(m.init_official) as f:
            model = load_official(f, m.official_variant, variant_config(m.official_variant, base=m.preset))
        return model, None, {"source": f"official {m.official_variant}: {m.init_official}"}
    if m.siglip2_path:
        model = init_encoder_from_siglip2(m.siglip2_path, preset(m.preset, latent_channels=m.latent_channels))
        standard_init(model, encoder=False)  # the pretrained encoder (and the release's t, b) stay
        return model, None, {"source": f"siglip2: {m.siglip2_path}"}
    torch.manual_seed(cfg.data.seed)
    model = AToken(preset(m.preset, latent_channels=m.latent_channels))
    fresh_sigmoid_init(model)
    info: dict = {"source": f"fresh {m.preset}", "fresh_init": cfg.init.fresh}
    if cfg.init.fresh == "zero":
        standard_init(model)
    elif cfg.init.fresh == "pca":
        mods = tuple(x for x in ("image", "video") if any(TASK_MODALITY[t] == x and t.endswith("_rec") for t in cfg.tasks))
        samples = init_samples(cfg, mods or ("image",))
        info.update({f"pca_{k}": v for k, v in linear_path_init(model, samples).items()})
    return model, None, info


def build_start_model(cfg: TrainConfig) -> tuple[AToken, torch.Tensor | None, dict]:
    model, proj, info = source_model(cfg)
    m = cfg.model
    rec_mods = tuple(x for x in ("image", "video") if f"{x}_rec" in cfg.tasks)
    if model.config.latent_channels > m.latent_channels:
        raise ValueError(f"model.latent_channels={m.latent_channels} but the starting model has "
                         f"{model.config.latent_channels}; latents only grow")
    if model.config.latent_channels < m.latent_channels:
        if cfg.init.growth == "data" and rec_mods:
            info["growth"] = grow_latent_from_data(model, init_samples(cfg, rec_mods), m.latent_channels)
        else:
            model.grow_latent(m.latent_channels)
            info["growth"] = {"method": "zero"}
    if m.fsq and model.quantizer is None:
        if cfg.init.fsq == "fit" and rec_mods:
            info["fsq"] = fsq_switch_from_data(model, init_samples(cfg, rec_mods))
        else:
            model.enable_fsq()
            info["fsq"] = {"method": "plain"}
    if "3d_rec" in cfg.tasks:
        grid = shard_grid(cfg.data.shards)
        if grid is None:
            raise ValueError(f"data.ratios has 3d_rec but {cfg.data.shards} holds no 3D training rows")
        fresh = model.gs_decoder is None or (model.gs_decoder.out_layer.weight.abs().sum() == 0
                                             and model.gs_decoder.cfg.resolution != grid)
        if fresh:  # none yet, or the preset's untrained one on another grid
            model.attach_gaussian_decoder(gaussian_decoder_for_grid(model.config.gaussian_decoder, grid))
            info["gaussian_init"] = gaussian_decoder_init(model, init_assets(cfg))
        elif model.gs_decoder.cfg.resolution != grid:  # a trained decoder learned another grid's geometry
            raise ValueError(f"the starting model's Gaussian decoder places Gaussians on a {model.gs_decoder.cfg.resolution}^3 "
                             f"grid but the shards' voxels come from a {grid}^3 grid (ingest threed.grid); "
                             "ingest with the decoder's grid or start from a model without a Gaussian decoder")
        info["gaussian_grid"] = grid
    model.config.gradient_checkpointing = m.gradient_checkpointing
    return model, proj, info


def caption_embeddings(cfg: TrainConfig) -> tuple[list[str], torch.Tensor] | None:
    """Every distinct training caption of the stage's understanding tasks, embedded by the text tower.
    Embeddings are cached per tower beside the shards (`<shards>/../text_embeddings/<tower>/`) for every
    training caption of every modality at once, so the text tower loads at most once per workflow (the
    first stage with an understanding task), not in every stage or worker."""
    und = sorted({TASK_MODALITY[t] for t in cfg.tasks if t.endswith("_und")})
    if not und:
        return None
    wanted = sorted({r["caption"] or "" for mod in und
                     for r in iter_rows(cfg.data.shards, modality=mod, split="train", columns=["caption"])})
    return wanted, cached_text_embeddings(cfg.data.shards, cfg.losses.text_tower, cfg.losses.text_path, wanted)


def text_cache(shards: str, tower: str, path: str) -> str:
    import hashlib

    key = hashlib.sha1(f"{tower}:{path}".encode()).hexdigest()[:12]
    return storage.join(shards.rstrip("/").rsplit("/", 1)[0], "text_embeddings", f"{tower}-{key}")


def cached_text_embeddings(shards: str, tower: str, path: str, texts: list[str]) -> torch.Tensor:
    """Text-tower embeddings [len(texts), D] from the cache beside the shards. On a miss the tower loads
    once and embeds every caption of the shards (all modalities and splits) with the texts asked for, so
    the later stages' workers and evaluations find them all (the tower's import and load cost 6 s)."""
    cache = text_cache(shards, tower, path)
    names, emb = read_text_cache(cache)
    if not set(texts) <= set(names):
        from atoken.text import text_tower

        every = {r["caption"] or "" for r in iter_rows(shards, columns=["caption"])} | set(texts)
        missing = sorted(every - set(names))
        new = text_tower(tower, path or None).encode(missing)
        names, emb = names + missing, new if emb is None else torch.cat([emb, new])
        write_text_cache(cache, names, emb)
    index = {c: i for i, c in enumerate(names)}
    return emb[[index[c] for c in texts]]


def read_text_cache(uri: str) -> tuple[list[str], torch.Tensor | None]:
    from safetensors.torch import load_file

    if not storage.exists(storage.join(uri, CAPTION_LIST)):
        return [], None
    with storage.local_path(storage.join(uri, CAPTIONS)) as p:
        emb = load_file(p)["embeddings"]
    return json.loads(storage.read_bytes(storage.join(uri, CAPTION_LIST))), emb


def write_text_cache(uri: str, names: list[str], emb: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        save_file({"embeddings": emb.contiguous()}, os.path.join(d, CAPTIONS))
        Path(d, CAPTION_LIST).write_text(json.dumps(names))
        storage.commit_file(os.path.join(d, CAPTIONS), storage.join(uri, CAPTIONS))
        storage.commit_file(os.path.join(d, CAPTION_LIST), storage.join(uri, CAPTION_LIST))  # last: marks it complete


def prepare_start(cfg: TrainConfig) -> dict:
    """Writes `<run>/start/` unless a previous attempt did; returns start.json."""
    out = start_dir(cfg)
    info_uri = storage.join(out, INFO)
    if storage.exists(info_uri):
        return json.loads(storage.read_bytes(info_uri))
    model, proj, info = build_start_model(cfg)
    write_export(model, proj, out, {"tower": cfg.losses.text_tower, "path": cfg.losses.text_path},
                 metadata={"stage": cfg.stage, "start": "1"})
    emb = caption_embeddings(cfg)
    if emb is not None:
        write_text_cache(out, *emb)
        info["captions"] = len(emb[0])
    info = json.loads(json.dumps(info, default=lambda v: float(v) if isinstance(v, (np.floating, float)) else str(v)))
    storage.commit_bytes(info_uri, json.dumps(info, indent=1).encode())  # last: marks the folder complete
    return info


def load_start(cfg: TrainConfig) -> tuple[AToken, torch.Tensor | None, dict[str, torch.Tensor]]:
    """(model, text projection, caption -> embedding) for a worker."""
    out = start_dir(cfg)
    model, proj, _ = load_export(out)
    names, emb = read_text_cache(out)
    captions = {c: emb[i] for i, c in enumerate(names)} if emb is not None else {}
    model.config.gradient_checkpointing = cfg.model.gradient_checkpointing
    return model, proj, captions

