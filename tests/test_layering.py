"""The module graph: no import circle (lazy imports inside functions included) and the layers hold."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGES = ("featurize", "heads")


def _imports(top_level_only: bool = False) -> dict[str, set[str]]:
    """``{module: {featurize/heads modules it imports anywhere}}`` (or only at module level); the
    package roots are left out (every submodule imports its package implicitly). ``torch`` is
    kept as a node so the torch-free rule can be checked."""
    graph = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            if path.stem == "__init__":
                continue
            name, deps = f"{pkg}.{path.stem}", set()
            tree = ast.parse(path.read_text())
            for node in (tree.body if top_level_only else ast.walk(tree)):
                if isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    deps.add(node.module)
                    deps |= {f"{node.module}.{a.name}" for a in node.names}  # from featurize import cache
            graph[name] = {"torch" if d.split(".")[0] == "torch" else d for d in deps}
    return {m: {d for d in deps if d == "torch" or (d in graph and d != m)} for m, deps in graph.items()}


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
    assert _cycles({m: deps - {"torch"} for m, deps in _imports().items()}) == []


def test_every_import_names_a_module_that_exists():
    """A renamed module leaves no import of its old name behind (``featurize.extract`` became
    ``featurize.extraction``: a lazy import of the old name failed only when that line ran)."""
    files = [*(ROOT / "featurize").glob("*.py"), *(ROOT / "heads").glob("*.py"), ROOT / "cli.py",
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    modules = {f"{pkg}.{p.stem}" for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")} | set(PACKAGES)
    stale = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            stale += [f"{path.name}: {n}" for n in names if n.split(".")[0] in PACKAGES and n not in modules]
    assert stale == []


def test_layers():
    graph = {m: deps - {"torch"} for m, deps in _imports().items()}
    core = {m for m in graph if m.startswith("featurize.")} - {"featurize.workflow", "featurize.api"}
    # featurize's core never imports heads
    assert not {d for m in core for d in graph[m] if d.startswith("heads.")}
    # heads, the cache/registry base and the API's entry points never import torch at import time
    top = _imports(top_level_only=True)

    def reaches_torch(m, seen=()):
        return "torch" in top[m] or any(reaches_torch(d, seen + (m,)) for d in top[m] - {"torch"} if d not in seen)

    for m in [*(m for m in top if m.startswith("heads.")), "featurize.cache", "featurize.layout", "featurize.registry",
              "featurize.files", "featurize.inventory", "featurize.workflow", "featurize.api", "featurize.extraction"]:
        assert not reaches_torch(m), m
    # only the cache's owner builds its paths
    for path in [*(ROOT / "featurize").glob("*.py"), *(ROOT / "heads").glob("*.py"), ROOT / "cli.py"]:
        if path.name != "layout.py":
            text = path.read_text()
            assert not any(f'/ "{d}"' in text for d in ("datasets", "features", "engines", "heads", "reports")), path


LAYOUT_NAMES = ("datasets", "features", "engines", "heads", "reports", "runs")


def _path_builders(tree) -> list[str]:
    """Layout folder names used to build a path: ``x / "heads"``, ``os.path.join(x, "heads")``,
    ``Path(x, "heads")``, ``.joinpath("heads")``, ``f"{x}/heads/..."`` (a bare key or a docstring is fine)."""
    found = []
    for node in ast.walk(tree):
        parts = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [node.left, node.right]
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            parts = node.args if name in ("join", "joinpath", "Path", "PurePath") else []
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            found += [d for d in LAYOUT_NAMES if f"/{d}/" in text or text.startswith(f"{d}/")]
        found += [p.value for p in parts if isinstance(p, ast.Constant) and p.value in LAYOUT_NAMES]
    return found


def test_only_the_layout_builds_cache_paths():
    """The ``Cache`` (featurize/layout.py) owns the cache's layout: no other module joins a layout
    folder name onto a path (the check itself is checked on a line that does)."""
    assert _path_builders(ast.parse('p = root / "heads"; q = os.path.join(c, "datasets"); r = f"{c}/runs/x"')) \
        == ["heads", "datasets", "runs"]
    offenders = {}
    for path in [*(ROOT / "featurize").glob("*.py"), *(ROOT / "heads").glob("*.py"), ROOT / "cli.py"]:
        if path.name != "layout.py":
            found = _path_builders(ast.parse(path.read_text()))
            if found:
                offenders[path.name] = found
    assert offenders == {}
