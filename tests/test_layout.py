"""The package's layout, read from the sources (ast, nothing imported): no import cycle, imports only
point down the layers, no module over 400 lines, every subpackage says its job, and the deployable
ONNX runtime imports no training code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zoact_edge"

# Lowest first. A module may import from its own layer or any layer below it, never from one above.
LAYERS = [
    {"errors", "paths", "memory", "seeds", "environment"},  # the ground: no zoact_edge imports but each other
    {"config"},  # every command's options and the rules between them
    {"models", "rundir", "data"},  # the frozen model, run folders, examples -> batches -> loss
    {"adapters"},  # targets, the layer, bases, build_adapters, adapter files
    {"zo"},  # the estimator, loss engines, prefix sharing, ranks, the baselines' steps
    {"onnx", "profiling"},  # ONNX export/runtime and the ORT engine; memory meter, fit, profile
    {"recipes"},  # tune: harness + one recipe per method family
    {"cli"},  # the command line
    {"__main__", "__init__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom, modules: dict) -> list[str]:
    """The zoact_edge modules an ``import from`` names (function-level imports included)."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("zoact_edge"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in modules else target)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node, modules)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("zoact_edge")]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER_OF[parts[1] if len(parts) > 1 else "__init__"]


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["zoact_edge.recipes.zoact"]  # the graph was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_has_a_layer_and_imports_only_point_down():
    graph = import_graph()
    upward = [f"{m} -> {n}" for m, deps in graph.items() for n in deps if _layer(n) > _layer(m)]
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(sorted(upward))


def test_the_onnx_runtime_imports_no_training_code():
    graph = import_graph()
    seen, todo = set(), ["zoact_edge.onnx.runtime"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    training = ("zoact_edge.adapters", "zoact_edge.zo", "zoact_edge.recipes", "zoact_edge.profiling",
                "zoact_edge.onnx.loss_graph", "zoact_edge.onnx.ort_engine", "zoact_edge.onnx.export")
    assert not [m for m in seen if m.startswith(training)]


def test_no_module_is_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_subpackage_says_its_job(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 8, f"zoact_edge/{package}/__init__.py: say what the package is for"
