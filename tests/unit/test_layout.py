"""Package layout: every package folder is installed, the engine imports neither integrations nor the
agent (nor their third-party libraries), and importing the engine has no side effects."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import corolla.engine

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"engine": "corolla.engine", "integrations": "corolla.integrations", "agent": "corolla.agent"}
FORBIDDEN = ("langchain", "llama_index", "pystray", "corolla.agent", "corolla.integrations")

pytestmark = pytest.mark.timeout(120)


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def package_folders() -> dict[str, Path]:
    """Import name → folder, for every folder with an ``__init__.py`` under the three roots."""
    found: dict[str, Path] = {}
    for root, name in ROOTS.items():
        for init in (REPO / root).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(REPO / root)
            found[".".join([name, *rel.parts])] = init.parent
    return found


def test_repo_root_is_found() -> None:
    assert (REPO / "pyproject.toml").exists()
    assert Path(corolla.engine.__file__).resolve().parent == REPO / "engine"


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools = pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = package_folders()
    assert set(folders) - listed == set(), "package folders missing from [tool.setuptools] packages"
    assert listed - set(folders) == set(), "pyproject lists packages that have no folder"
    assert setuptools["package-dir"] == {name: root for root, name in ROOTS.items()}


def test_every_folder_with_python_files_is_a_package() -> None:
    for root in ROOTS:
        for py in (REPO / root).rglob("*.py"):
            if "__pycache__" not in py.parts:
                assert (py.parent / "__init__.py").exists(), f"{py.parent} has modules but no __init__.py"


class _WithoutTypeChecking(ast.NodeTransformer):
    """Replaces each ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) block by its ``else`` branch."""

    def visit_If(self, node: ast.If) -> ast.AST | list[ast.stmt]:
        self.generic_visit(node)
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            return node.orelse
        return node


def imported_modules(path: Path, *, runtime_only: bool = False) -> set[str]:
    """Every module name an ``import`` statement in the file names (function-level imports included).

    ``runtime_only`` leaves out the imports under ``if TYPE_CHECKING:`` (annotations only; never run).
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    if runtime_only:
        tree = _WithoutTypeChecking().visit(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.add("." * node.level + (node.module or ""))  # relative: flagged below
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
            "import_module",
            "__import__",
        }:
            names.update(arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
    return names


def is_forbidden(module: str) -> bool:
    top = module.split(".")[0]
    return (
        top.startswith(("langchain", "llama_index"))
        or top == "pystray"
        or module.startswith(("corolla.agent", "corolla.integrations"))
        or top in ("engine", "agent", "integrations")  # the folder names are not import names
    )


def test_engine_sources_import_no_forbidden_module() -> None:
    offenders = {}
    files = [p for p in (REPO / "engine").rglob("*.py") if "__pycache__" not in p.parts]
    assert len(files) > 10
    for path in files:
        bad = sorted(m for m in imported_modules(path) if is_forbidden(m) or m.startswith("."))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


def test_forbidden_import_scanner_catches_the_forms_it_claims(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import langchain_core.messages\n"
        "from corolla.agent import app\n"
        "def f():\n    from llama_index.core import x\n    import pystray\n"
        "import importlib\nimportlib.import_module('corolla.integrations.langchain')\n"
        "from corolla.engine import config\n"
    )
    flagged = {m for m in imported_modules(sample) if is_forbidden(m)}
    assert {"langchain_core.messages", "corolla.agent", "llama_index.core", "pystray"} <= flagged
    assert "corolla.integrations.langchain" in flagged
    assert not any(m.startswith("corolla.engine") for m in flagged)


FRESH_IMPORT = """
import json, logging, os, sys, threading
root = logging.getLogger()
before = dict(handlers=list(root.handlers), level=root.level, threads={t.ident for t in threading.enumerate()},
              env=dict(os.environ))
import corolla.engine, corolla.engine.client.model, corolla.engine.server.server, corolla.engine.apps.cli
import corolla.engine.models.checkpoint, corolla.engine.apps.local_swarm, corolla.engine.apps.tiny_models
corolla_logger = logging.getLogger("corolla")
print(json.dumps(dict(
    forbidden=sorted(m for m in sys.modules if m.startswith(FORBIDDEN)),
    root_handlers_added=[repr(h) for h in root.handlers if h not in before["handlers"]],
    root_level_changed=root.level != before["level"],
    corolla_handlers=[repr(h) for h in corolla_logger.handlers],
    corolla_propagates=corolla_logger.propagate,
    new_threads=[t.name for t in threading.enumerate() if t.ident not in before["threads"]],
    env_changed=sorted(k for k in set(os.environ) | set(before["env"]) if os.environ.get(k) != before["env"].get(k)),
)))
""".replace("FORBIDDEN", repr(FORBIDDEN))


@pytest.fixture(scope="module")
def fresh_import(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """What importing the engine did, observed in a fresh interpreter (this one has imported it already)."""
    result = subprocess.run(
        [sys.executable, "-c", FRESH_IMPORT],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path_factory.mktemp("fresh"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_importing_the_engine_loads_no_forbidden_module(fresh_import: dict[str, object]) -> None:
    assert fresh_import["forbidden"] == []


def test_importing_the_engine_has_no_side_effects(fresh_import: dict[str, object]) -> None:
    assert fresh_import["root_handlers_added"] == []
    assert fresh_import["root_level_changed"] is False
    assert fresh_import["corolla_handlers"] == []
    assert fresh_import["corolla_propagates"] is True
    assert fresh_import["new_threads"] == []
    assert fresh_import["env_changed"] == []
