"""Hydra structured configs: the typed dataclasses of each layer, registered once, composed with
command-line overrides, and validated at start-up (errors name the full key)."""
from __future__ import annotations

from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestration.workflow_config import WorkflowConfig
from pipelines.config import IngestConfig

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    cs = ConfigStore.instance()
    cs.store(name="ingest_schema", node=IngestConfig)
    cs.store(name="workflow_schema", node=WorkflowConfig)
    _REGISTERED = True


def load(config_name: str, overrides: list[str]) -> Any:
    """Composes `orchestration/conf/<config_name>.yaml` with overrides -> the validated dataclass."""
    register()
    try:
        with initialize_config_module(config_module="orchestration.conf", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConf validation, hydra override grammar, unknown keys
        if isinstance(e, OmegaConfBaseException) or type(e).__module__.startswith(("hydra", "omegaconf")):
            raise ValueError(f"config error: {_chain(e)}") from None
        raise
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _chain(e: BaseException) -> str:
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(" ".join(str(e).split()))
        e = e.__cause__ or e.__context__
    return " <- ".join(p for p in parts if p)


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))
