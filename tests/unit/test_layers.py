"""The layer rules of docs/architecture.md, checked on the source."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
# layer -> top-level modules it must never import
FORBIDDEN = {
    "atoken": {"ray", "mlflow", "hydra", "omegaconf", "preprocess", "pipelines", "trainers", "orchestration"},
    "preprocess": {"ray", "mlflow", "hydra", "pipelines", "trainers", "orchestration"},
    "pipelines": {"mlflow", "hydra", "trainers", "orchestration", "deepspeed"},
    "trainers": {"mlflow", "hydra", "orchestration"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_never_imports_what_it_must_not(layer):
    bad = {}
    for f in (ROOT / layer).rglob("*.py"):
        hit = _imports(f) & FORBIDDEN[layer]
        if hit:
            bad[str(f.relative_to(ROOT))] = sorted(hit)
    assert not bad


def test_nothing_imports_orchestration():
    bad = [str(f.relative_to(ROOT)) for d in ("atoken", "preprocess", "pipelines", "trainers")
           for f in (ROOT / d).rglob("*.py") if "orchestration" in _imports(f)]
    assert not bad
