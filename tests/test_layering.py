"""The module graph: no import circle (lazy imports inside functions included) and the layers hold."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGES = ("featurize", "heads")


def _imports() -> dict[str, set[str]]:
    """``{module: {featurize/heads modules it imports anywhere}}``; the package roots are left out
    (every submodule imports its package implicitly)."""
    graph = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path.stem == "__init__":
                continue
            name, deps = f"{pkg}.{path.stem}", set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    deps.add(node.module)
                    deps |= {f"{node.module}.{a.name}" for a in node.names}  # from featurize import cache
            graph[name] = {d for d in deps if d.split(".")[0] in PACKAGES and d not in PACKAGES}
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_circle():
    assert _cycles(_imports()) == []


def test_layers():
    graph = _imports()
    core = {m for m in graph if m.startswith("featurize.")} - {"featurize.workflow", "featurize.api"}
    # featurize's core never imports heads; heads never imports the torch modules or the joining layer
    assert not {d for m in core for d in graph[m] if d.startswith("heads.")}
    torch_free = {"featurize.errors", "featurize.layout", "featurize.cache", "featurize.dataset", "featurize.registry",
                  "featurize.files", "featurize.inventory", "featurize.workflow", "featurize.api"}
    for m in [m for m in graph if m.startswith("heads.")]:
        assert graph[m] <= torch_free | {d for d in graph[m] if d.startswith("heads.")}, m
    # only the cache's owner builds its paths
    for path in [*(ROOT / "featurize").glob("*.py"), *(ROOT / "heads").glob("*.py"), ROOT / "cli.py"]:
        if path.name != "layout.py":
            text = path.read_text()
            assert not any(f'/ "{d}"' in text for d in ("datasets", "features", "engines", "heads", "reports")), path
