"""The package's shape, read from its source with ``ast`` (nothing is imported; in process,
well under a second): every module of sidecar/ sits in a layer and imports only its own
layer and the layers below (docs/design.md), no modules import each other in a circle, no
import hides inside a function without a reason, and no module imports another's private
names.

What the code does today against these rules is listed below, each entry with why it is
there. The lists hold exactly today's exceptions: one that is no longer true fails
``test_every_listed_exception_still_exists``, so a change that removes a violation also
removes its line, and the lists only shrink."""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from tests.support.paths import ROOT

PACKAGE = ROOT / "sidecar"

# Top to bottom: a module imports modules of its own layer or of a layer below it. A name
# covers the module and everything under it; the longest name that covers a module wins.
LAYERS: list[tuple[str, list[str]]] = [
    # the commands and the wiring: parse arguments and files, build the parts, start them
    ("entry", ["sidecar.cli", "sidecar.server", "sidecar.workers", "sidecar.ledger.cli",
               "sidecar.envoy_config", "sidecar.capacity", "sidecar.plan", "sidecar.flows",
               "sidecar.server_config", "sidecar.credentials", "sidecar.listen",
               "sidecar.http_routes", "sidecar.reload", "sidecar.worker_metrics",
               "sidecar.status", "sidecar.overlay_sync", "sidecar.tenants_api",
               "sidecar.tenants_cli", "sidecar.admin_client"]),
    # Envoy's protocols in, the flows' answers out
    ("transports", ["sidecar.transports"]),
    # request -> decision, finished response -> settled charge and ledger event
    ("flows", ["sidecar.decision", "sidecar.settlement", "sidecar.anomaly"]),
    # where the state lives: embedded (Cython core) or Redis (Lua scripts)
    ("backends", ["sidecar.backends"]),
    # the policy file: schema, meaning checks, compiled limits
    ("policy", ["sidecar.policy"]),
    # the events kept for the books, and their sinks
    ("ledger", ["sidecar.ledger", "sidecar.tracing"]),
    # values and rules every layer above shares: the answer's contract, the request's model,
    # metrics, credentials, usage formats and prices, addresses
    ("values", ["sidecar.contract", "sidecar.model", "sidecar.endpoints", "sidecar.metrics",
                "sidecar.auth", "sidecar.address", "sidecar.stop_signals", "sidecar.burstlog",
                "sidecar.upstream_sli", "sidecar.attribution"]),
    # generated or compiled: the decision core (native/core.pyx) and our protobufs
    ("core", ["sidecar._core", "sidecar._als_wire", "sidecar._proto"]),
]

# (importer, imported): an import from a layer above, today.
UPWARD_TODAY: dict[tuple[str, str], str] = {}

# Modules importing each other in a circle today (an import inside a function or under
# TYPE_CHECKING is still an arrow), each circle by its members.
CIRCLES_TODAY: dict[frozenset[str], str] = {
}

# An import inside a function, allowed for a reason that stays.
LAZY_IMPORTS: dict[str, str] = {
    "sidecar.cli": "imports only the standard library at the top: until main() holds "
                   "SIGINT and SIGTERM, a signal would interrupt an import (its docstring)",
    "sidecar.ledger.cli": "registered by sidecar.cli, under the same rule",
}
# (importer, imported) inside a function, today.
FUNCTION_IMPORTS_TODAY: dict[tuple[str, str], str] = {
    ("sidecar.ledger.postgres", "psycopg"): "reason not stated (a file-sink ledger never "
                                            "loads libpq)",
    ("sidecar.ledger.recorder", "sidecar.ledger.postgres"): "reason not stated in the code",
    ("sidecar.ledger.deadletter", "sidecar.ledger.postgres"): "reason not stated in the code",
    ("sidecar.ledger.deadletter", "sidecar.ledger.storable"): "reason not stated in the code",
    ("sidecar.ledger.stats", "sidecar.ledger.postgres"): "reason not stated in the code",
    ("sidecar.ledger.stats", "sidecar.ledger.sinks"): "reason not stated in the code",
}

# (importer, imported module, private name) today.
PRIVATE_IMPORTS_TODAY: dict[tuple[str, str, str], str] = {
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a module: sidecar's own resolved to the module file, others as written
    names: tuple[str, ...]  # the names taken from it (from X import a, b)
    in_function: bool
    line: int


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """sidecar's modules by name (the generated sidecar/_proto aside)."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if "_proto" not in parts:
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def own(name: str, known: set[str]) -> Optional[str]:
    """The sidecar module ``name`` is, or is in (a name imported from a module), or None
    for another package's module."""
    if name != "sidecar" and not name.startswith("sidecar."):
        return None
    if name.startswith(("sidecar._proto", "sidecar._core", "sidecar._als_wire")):
        return name.split(".")[0] + "." + name.split(".")[1]
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

    def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(name, own(alias.name, known) or alias.name, (), inside,
                                 child.lineno)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if own(base, known) is None:
                    yield Import(name, base, tuple(a.name for a in child.names), inside,
                                 child.lineno)
                    continue
                for alias in child.names:  # from sidecar import _core, contract: modules
                    target = own(f"{base}.{alias.name}", known)
                    assert target is not None
                    taken = () if target == f"{base}.{alias.name}" else (alias.name,)
                    yield Import(name, target, taken, inside, child.lineno)
            yield from walk(child, inside)

    yield from walk(tree, False)


@functools.lru_cache(maxsize=None)  # the source is read once per run
def all_imports(package: Path = PACKAGE) -> tuple[Import, ...]:
    found = modules(package)
    known = set(found) | {"sidecar._core", "sidecar._als_wire", "sidecar._proto"}
    return tuple(i for name, path in sorted(found.items()) for i in imports_of(name, path, known))


def layer_of(module: str) -> Optional[int]:
    best: Optional[tuple[int, int]] = None  # (length of the name, layer)
    for rank, (_, names) in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > best[0]):
                best = (len(n), rank)
    return None if best is None else best[1]


def own_arrows(imports: tuple[Import, ...]) -> set[tuple[str, str]]:
    return {(i.importer, i.imported) for i in imports
            if i.imported.startswith("sidecar.") and i.imported != i.importer}


def upward(imports: tuple[Import, ...]) -> dict[tuple[str, str], int]:
    """(importer, imported) -> line, where imported is in a layer above the importer's."""
    out: dict[tuple[str, str], int] = {}
    for i in imports:
        if not i.imported.startswith("sidecar."):
            continue
        a, b = layer_of(i.importer), layer_of(i.imported)
        if a is not None and b is not None and b < a:
            out.setdefault((i.importer, i.imported), i.line)
    return out


def circles(arrows: set[tuple[str, str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(arrows):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def function_imports(imports: tuple[Import, ...]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for i in imports:
        if i.in_function and i.importer not in LAZY_IMPORTS:
            out.setdefault((i.importer, i.imported), i.line)
    return out


def private_imports(imports: tuple[Import, ...]) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    for i in imports:
        if i.imported.startswith("sidecar.") and i.imported != i.importer:
            for n in i.names:
                if n.startswith("_") and not n.startswith("__"):
                    out.setdefault((i.importer, i.imported, n), i.line)
    return out


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    missing = sorted(m for m in modules() if m != "sidecar" and layer_of(m) is None)
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


def test_no_module_imports_from_a_layer_above_its_own():
    found = upward(all_imports())
    new = [f"{where(a, line)}: {a} ({LAYERS[layer_of(a)][0]}) imports {b} "  # type: ignore[index]
           f"({LAYERS[layer_of(b)][0]})"  # type: ignore[index]
           for (a, b), line in sorted(found.items()) if (a, b) not in UPWARD_TODAY]
    assert not new, "\n".join(new)


def test_no_modules_import_each_other_in_a_circle():
    new = [sorted(c) for c in circles(own_arrows(all_imports())) if c not in CIRCLES_TODAY]
    assert not new, f"import circles: {new}"


def test_no_import_inside_a_function_without_a_reason():
    found = function_imports(all_imports())
    new = [f"{where(a, line)}: {a} imports {b} inside a function"
           for (a, b), line in sorted(found.items()) if (a, b) not in FUNCTION_IMPORTS_TODAY]
    assert not new, "\n".join(new) + (
        "\nimport at the top (an import circle is not a reason: break the circle), or list "
        f"the module in LAZY_IMPORTS ({Path(__file__).name}) with the reason")


def test_no_module_imports_another_modules_private_names():
    found = private_imports(all_imports())
    new = [f"{where(a, line)}: {a} imports {n} from {b}"
           for (a, b, n), line in sorted(found.items()) if (a, b, n) not in PRIVATE_IMPORTS_TODAY]
    assert not new, "\n".join(new)


def test_every_listed_exception_still_exists():
    imports = all_imports()
    stale = ([f"UPWARD_TODAY {k}" for k in UPWARD_TODAY if k not in upward(imports)]
             + [f"CIRCLES_TODAY {sorted(k)}" for k in CIRCLES_TODAY
                if k not in circles(own_arrows(imports))]
             + [f"FUNCTION_IMPORTS_TODAY {k}" for k in FUNCTION_IMPORTS_TODAY
                if k not in function_imports(imports)]
             + [f"PRIVATE_IMPORTS_TODAY {k}" for k in PRIVATE_IMPORTS_TODAY
                if k not in private_imports(imports)]
             + [f"LAZY_IMPORTS {k}" for k in LAZY_IMPORTS if k not in modules()])
    assert not stale, ("fixed, or the module moved: remove (or rename) in "
                       f"{Path(__file__).name}: " + "; ".join(stale))


def test_the_settlement_flow_needs_nothing_of_the_decision_flow():
    """A decision makes the reservation the settlement closes: the decision flow uses the
    settlement's public book, bound and refunds; the settlement flow imports nothing of the
    decision flow, and neither reaches into the other's private names."""
    imports = all_imports()
    wrong = sorted(f"{where(i.importer, i.line)}: {i.importer} imports {i.imported}"
                   for i in imports if i.importer.startswith("sidecar.settlement")
                   and i.imported.startswith("sidecar.decision"))
    private = sorted(f"{where(i.importer, i.line)}: {i.importer} imports {n} from {i.imported}"
                     for i in imports if i.importer.startswith("sidecar.decision")
                     and i.imported.startswith("sidecar.settlement")
                     for n in i.names if n.startswith("_"))
    assert not wrong and not private, wrong + private


# --- the check itself, on made-up modules ------------------------------------------------
def test_the_checks_find_what_they_are_for(tmp_path):
    """A circle, an upward import, an import in a function and a private name, written
    into a scratch package: each check reports its own, and nothing else."""
    pkg = tmp_path / "sidecar"
    for sub in ("policy", "transports"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "contract.py").write_text("from sidecar import model\n")
    (pkg / "model.py").write_text("import sidecar.contract\n")
    (pkg / "policy" / "load.py").write_text("from sidecar.transports.authz import handler\n")
    (pkg / "transports" / "authz.py").write_text(
        "from sidecar.contract import _secret\n\n\n"
        "def handler():\n    from sidecar import model\n    return model, _secret\n")
    imports = all_imports(pkg)
    assert circles(own_arrows(imports)) == [frozenset({"sidecar.contract", "sidecar.model"})]
    assert set(upward(imports)) == {("sidecar.policy.load", "sidecar.transports.authz")}
    assert set(function_imports(imports)) == {("sidecar.transports.authz", "sidecar.model")}
    assert set(private_imports(imports)) == {("sidecar.transports.authz", "sidecar.contract",
                                              "_secret")}
