"""The layer rules of ../shared/DESIGN.md (docs/architecture.md), checked on the source: every import,
at module level or inside a function, counts."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("atoken", "preprocess", "pipelines", "trainers", "orchestration")
# layer -> top-level modules it must never import
FORBIDDEN = {
    "atoken": {"ray", "mlflow", "hydra", "omegaconf", "preprocess", "pipelines", "trainers", "orchestration"},
    "preprocess": {"ray", "mlflow", "hydra", "omegaconf", "pipelines", "trainers", "orchestration"},
    "pipelines": {"mlflow", "hydra", "omegaconf", "trainers", "orchestration", "deepspeed"},
    "trainers": {"mlflow", "hydra", "omegaconf", "orchestration"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports (dotted names), anywhere in the file."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, f in files.items():
        graph[mod] = {i for i in _imports(f) if i in files and i != mod}
    return graph


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_never_imports_what_it_must_not(layer):
    bad = {}
    for f in (ROOT / layer).rglob("*.py"):
        hit = {i.split(".")[0] for i in _imports(f)} & FORBIDDEN[layer]
        if hit:
            bad[str(f.relative_to(ROOT))] = sorted(hit)
    assert not bad


def test_nothing_imports_orchestration():
    bad = [str(f.relative_to(ROOT)) for d in ("atoken", "preprocess", "pipelines", "trainers")
           for f in (ROOT / d).rglob("*.py") if any(i.split(".")[0] == "orchestration" for i in _imports(f))]
    assert not bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_the_packages():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The check reads function-level imports: a model that imported its weight adapter inside a method
    (the adapter importing the model) is a cycle."""
    graph = {"atoken.model": {"atoken.official"}, "atoken.official": {"atoken.model"}, "atoken.config": set()}
    assert _cycles(graph) == [["atoken.model", "atoken.official"]]
    src = ROOT / "atoken" / "model.py"
    tree = ast.parse(src.read_text())
    fn = ast.parse("def f():\n    from atoken.official import load_official\n")
    tree.body.append(fn.body[0])
    tmp = tmp_path / "model.py"
    tmp.write_text(ast.unparse(tree))
    assert "atoken.official" in _imports(tmp)
