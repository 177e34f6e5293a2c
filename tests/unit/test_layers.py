"""The engine's layers, read from its import statements (docs/architecture.md draws them).

ground (the engine root: config, errors, logs, version, procs, hub, the package itself)
  < core (wire, models, dht, routing) < roles (server, client) < apps (the faces and the swarm kit).

A module imports only from its own layer or below, the server and the client never import each other,
and no modules import each other in a loop. Every import counts, module-level or inside a function;
those under ``if TYPE_CHECKING:`` (annotations only) do not. Integrations and the agent use the engine
only through the names listed here, and no product code imports the tests' helper modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_layout import REPO, imported_modules

import corolla.engine

pytestmark = pytest.mark.timeout(60)

ENGINE = "corolla.engine"
GROUND, CORE, ROLES, APPS = 0, 1, 2, 3
LAYER_NAMES = ("ground", "core", "roles", "apps")
# The top folder or root module under engine/ → its layer. A new root module or folder must be placed here.
LAYERS = {
    "__init__": GROUND,
    "config": GROUND,
    "errors": GROUND,
    "logs": GROUND,
    "version": GROUND,
    "procs": GROUND,
    "hub": GROUND,
    "wire": CORE,
    "models": CORE,
    "dht": CORE,
    "routing": CORE,
    "server": ROLES,
    "client": ROLES,
    "apps": APPS,
}
# Same-layer pairs that must not import each other (either way): a server is not a client, and the reverse.
APART = {frozenset({"server", "client"})}

# What the other packages may import from the engine: its public names (``corolla.engine.__all__``) and
# these modules. The agent starts servers as ``python -m corolla.engine.apps.cli`` (a command, not an import).
OUTSIDE_ALLOWED = {
    "integrations": {ENGINE, f"{ENGINE}.hub"},  # hub: the same access check and token as the model's
    "agent": {ENGINE},
}
PRODUCT = ("engine", "integrations", "agent", "examples")


def python_files(folder: Path) -> Iterator[Path]:
    return (p for p in sorted(folder.rglob("*.py")) if "__pycache__" not in p.parts)


def engine_modules() -> dict[str, Path]:
    """Import name → file, for every module under engine/ (a package is its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for path in python_files(REPO / "engine"):
        parts = list(path.relative_to(REPO / "engine").with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([ENGINE, *parts])] = path
    return found


MODULES = engine_modules()
LAZY: dict[str, str] = vars(corolla.engine)["_LAZY"]  # public client name → its module (PEP 562)


def group(module: str) -> str:
    """The top folder or root module of an engine module: ``corolla.engine.dht.records`` → ``dht``."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "__init__"


def engine_imports(path: Path) -> set[str]:
    """The engine modules a file imports at run time.

    ``from corolla.engine.dht import records`` names the module ``corolla.engine.dht.records``, not the
    package ``corolla.engine.dht``: a package counts only when a name that is not a module comes from it.
    A client name taken from the package (``from corolla.engine import InferenceSession``) counts as an
    import of the client module that defines it.
    """
    names = {n for n in imported_modules(path, runtime_only=True) if n == ENGINE or n.startswith(ENGINE + ".")}
    found: set[str] = set()
    for name in names:
        lazy = LAZY.get(name.removeprefix(ENGINE + "."))
        if name.startswith(ENGINE + ".") and lazy:  # a client name the package imports on first use
            found.add(lazy)
        elif name in MODULES:
            taken = {n for n in names if n.rpartition(".")[0] == name}  # ``from name import a, b``
            if not taken or taken - set(MODULES):  # the module itself, or names (not modules) taken from it
                found.add(name)
        elif name.rpartition(".")[0] not in MODULES:
            raise AssertionError(f"{path.relative_to(REPO)} imports {name}, which is not an engine module")
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: engine_imports(path) - {module} for module, path in MODULES.items()}


def test_every_engine_module_has_a_layer() -> None:
    unplaced = sorted({group(m) for m in MODULES} - set(LAYERS))
    assert unplaced == [], f"place these in LAYERS of {Path(__file__).name} (and docs/architecture.md): {unplaced}"


def test_no_module_imports_a_higher_layer_or_across_roles() -> None:
    offenders = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            a, b = group(module), group(target)
            if LAYERS[b] > LAYERS[a]:
                offenders.append(
                    f"{module} ({LAYER_NAMES[LAYERS[a]]}) imports {target} ({LAYER_NAMES[LAYERS[b]]}, a higher layer)"
                )
            elif frozenset({a, b}) in APART:
                offenders.append(f"{module} imports {target}: {a} and {b} must not import each other")
    assert offenders == [], "\n".join(offenders)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the import loops)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(loops)


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete loop through the component's first module: ``[a, b, ..., a]`` (breadth-first, shortest)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle in {component}")  # pragma: no cover - a component always has one


def test_no_import_cycles_in_the_engine() -> None:
    graph = import_graph()
    loops = [
        " -> ".join(one_cycle(graph, c)) + f"  (loop of {len(c)}: {', '.join(c)})" for c in strongly_connected(graph)
    ]
    assert loops == [], "modules that import each other in a loop:\n" + "\n".join(loops)


def test_the_cycle_finder_finds_loops_and_only_loops() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_layer_scanner_skips_type_checking_and_resolves_submodules(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "from corolla.engine import procs\n"
        "from corolla.engine.dht import records\n"
        "if TYPE_CHECKING:\n    from corolla.engine.client.model import DistributedModelForCausalLM\n"
        "def f():\n    from corolla.engine.server.server import Server\n"
        "import importlib\nimportlib.import_module('corolla.engine.apps.cli')\n"
        "from corolla.engine import CorollaError, InferenceSession\n"
    )
    assert engine_imports(sample) == {
        "corolla.engine",
        "corolla.engine.client.session",
        "corolla.engine.procs",
        "corolla.engine.dht.records",
        "corolla.engine.server.server",
        "corolla.engine.apps.cli",
    }


def test_the_package_defers_only_to_client_modules() -> None:
    """``corolla.engine`` imports its client names on first use (PEP 562): the one reference from the
    ground upwards, to the client's public classes only."""
    assert LAZY and all(m.startswith(f"{ENGINE}.client.") and m in MODULES for m in LAZY.values())


def engine_names_used(path: Path) -> set[str]:
    return {n for n in imported_modules(path) if n == ENGINE or n.startswith(ENGINE + ".")}


@pytest.mark.parametrize("package", sorted(OUTSIDE_ALLOWED))
def test_integrations_and_agent_use_only_public_engine_names(package: str) -> None:
    allowed = OUTSIDE_ALLOWED[package]
    public = {f"{ENGINE}.{name}" for name in corolla.engine.__all__}
    offenders: dict[str, list[str]] = {}
    for path in python_files(REPO / package):
        bad = []
        for name in sorted(engine_names_used(path)):
            parent = name.rpartition(".")[0]
            if name in allowed or name in public or (parent in allowed - {ENGINE} and name not in MODULES):
                continue
            bad.append(name)
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}, f"{package} may import only corolla.engine's public names and {sorted(allowed)}"


@pytest.mark.parametrize("package", sorted(OUTSIDE_ALLOWED))
def test_engine_modules_named_in_strings_exist(package: str) -> None:
    """A module path in a string (``-m corolla.engine.apps.cli``) follows the module when it moves."""
    stale = []
    for path in python_files(REPO / package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
                dotted = text.startswith(ENGINE + ".") and text.replace(".", "").replace("_", "").isalnum()
                if dotted and text not in MODULES:
                    stale.append(f"{path.relative_to(REPO)}: {text}")
    assert stale == []


def test_product_code_never_imports_the_test_helpers() -> None:
    helpers = {p.stem for p in (REPO / "tests" / "support").glob("*.py")}
    assert helpers, "tests/support has no modules"
    offenders = {}
    for root in PRODUCT:
        for path in python_files(REPO / root):
            bad = sorted(n for n in imported_modules(path) if n.split(".")[0] in {*helpers, "tests"})
            if bad:
                offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}
