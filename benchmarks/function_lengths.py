"""The longest functions of featurize/ and heads/ (and cli.py), by source lines, as a markdown table.

    python benchmarks/function_lengths.py [ROOT] [--top 10] [--json]

``ROOT`` is a checkout (default: this one), e.g. a ``git worktree`` of an older commit, so two
states of the code can be compared. A function's length is its lines from ``def`` (decorators
excluded) to its last line, docstring and comments included; nested functions count within
their parent and on their own; methods are named ``Class.method``.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

FOLDERS = ("featurize", "heads")


def functions(root: Path) -> list[dict]:
    """Every function and method under ``root``'s packages: ``{"name", "file", "lines"}``."""
    files = [p for d in FOLDERS for p in sorted((root / d).glob("*.py"))] + [p for p in [root / "cli.py"] if p.exists()]
    out: list[dict] = []
    for path in files:
        _visit(ast.parse(path.read_text()), path.stem, str(path.relative_to(root)), "", out)
    return sorted(out, key=lambda f: -f["lines"])


def _visit(node, module: str, file: str, prefix: str, out: list[dict]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append({"name": f"{module}.{prefix}{child.name}", "file": file,
                        "lines": child.end_lineno - child.lineno + 1})
            _visit(child, module, file, f"{prefix}{child.name}.", out)
        elif isinstance(child, ast.ClassDef):
            _visit(child, module, file, f"{prefix}{child.name}.", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    found = functions(Path(args.root))
    over = sum(f["lines"] > 60 for f in found)
    if args.json:
        print(json.dumps({"top": found[:args.top], "functions": len(found), "over_60": over}))
        return
    print("| function | file | lines |\n|---|---|---:|")
    for f in found[:args.top]:
        print(f"| `{f['name']}` | {f['file']} | {f['lines']} |")
    print(f"\n{len(found)} functions, {over} over 60 lines")


if __name__ == "__main__":
    main()
