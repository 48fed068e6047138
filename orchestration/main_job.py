"""The main job behind `atoken run`: everything that exists of the pipeline, on embedded defaults."""
from __future__ import annotations

import json
import time
from pathlib import Path


def run_main_job(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.create({"work_dir": "atoken-work", "samples": {"digits_per_class": 50}}),
                          OmegaConf.from_dotlist(overrides))
    work = Path(cfg.work_dir).resolve()
    t0 = time.time()
    from preprocess.sample_corpus import CorpusConfig, build_corpus, read_manifest

    manifest = work / "samples" / "manifest.jsonl"
    if not manifest.is_file():
        build_corpus(work / "samples", CorpusConfig(digits_per_class=int(cfg.samples.digits_per_class)))
    rows = read_manifest(manifest)
    summary = {"work_dir": str(work), "manifest": str(manifest), "items": len(rows),
               "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(summary, indent=1))
    return 0
