"""The backends' import shape (docs/design.md, "The Redis backend"): no import circle
within sidecar/backends, and no import inside a function there (the way a circle used to
be hidden). Reads the source only: starts nothing."""
from __future__ import annotations

import ast
from pathlib import Path

BACKENDS = Path(__file__).resolve().parents[1] / "sidecar" / "backends"


def _module(path: Path) -> str:
    parts = path.relative_to(BACKENDS.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module(p): p for p in BACKENDS.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_circle_in_the_backends():
    graph = _imports()
    assert "sidecar.backends.redis.link" in graph  # the walk found the package
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import circle: " + " -> ".join(path + (name,))
        if name in done:
            return
        for dep in sorted(graph[name]):
            # a package's __init__ importing its own modules is not a circle
            if not name or not dep.startswith(name + "."):
                visit(dep, path + (name,))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_no_import_inside_a_function_in_the_backends():
    inside = []
    for path in BACKENDS.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside += [f"{path.name}:{n.lineno}" for n in ast.walk(fn)
                           if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert inside == []
