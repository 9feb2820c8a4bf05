"""The package's layers (DESIGN.md, "File map"): no import circle between modules, and no import
from a lower layer to a higher one. Read from the source (every import statement, also those
inside functions; `if TYPE_CHECKING:` blocks are type hints, not imports, and are skipped)."""
from __future__ import annotations

import ast
from pathlib import Path

import trident_rs

ROOT = Path(trident_rs.__file__).resolve().parent

# Bottom to top. A module may import from its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("vocab", "errors", "media", "client"),  # ground floor: shared names, no knowledge of models
    ("models",),  # model families: specs, loading, stage functions, tiny builders
    ("request", "policy"),  # a request's parameters; the pure decision layer (no ray, no torch)
    ("executors", "sim", "profiles"),  # run one stage; simulate policies; derive cost tables
    ("pipeline_runner", "profiler"),  # the one local path: three stages in process; measure cost tables
    ("serve",),  # the Ray Serve runtime
    ("cli", "devtools"),  # the command line; the demo and development tools around the runtime
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST, modules: dict[str, Path]) -> set[str]:
    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trident_rs"):
            found.update(resolve(f"{node.module}.{a.name}") for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names if a.name.startswith("trident_rs"))
        stack.extend(ast.iter_child_nodes(node))
    return {m for m in found if m}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(ast.parse(p.read_text()), modules) - {m} for m, p in modules.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else -1  # the package's __init__ sits below all


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _graph() if _layer(m) is None)
    assert not unplaced, f"add these to LAYERS (and DESIGN.md's file map): {unplaced}"


def test_no_import_runs_up_a_layer():
    upward = sorted(f"{a} -> {b}" for a, targets in _graph().items() for b in targets
                    if b != "trident_rs" and _layer(b) > _layer(a))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"
