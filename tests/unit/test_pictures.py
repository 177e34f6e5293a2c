"""Tests write only to temporary folders; the README's pictures come from ``.ci/pictures.sh`` alone.

The tests that take the pictures save them where an environment variable says, else under their
``tmp_path``; the script sets those variables to the files the README shows.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "pictures.sh"
# (variable, the test file that reads it, the README's picture it is set to)
PICTURES = [
    ("COROLLA_MONITOR_SCREENSHOT", "tests/swarm/test_monitor_swarm.py", "docs/monitor.png"),
    ("COROLLA_TRAY_SCREENSHOT", "tests/agent/test_agent_tray_gui.py", "docs/tray-menu.png"),
]
INTO_REPO_DOCS = re.compile(r"^(\.\./)*docs(/|$)")  # "docs", "docs/x.png", "../docs/x.png"


def code_strings(path: Path) -> Iterator[tuple[int, str]]:
    """The string constants of a Python file's code (docstrings left out: they may name ``docs/``)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_test_builds_a_path_into_docs() -> None:
    this = Path(__file__).resolve()
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if path.resolve() != this
        for line, text in code_strings(path)
        if INTO_REPO_DOCS.match(text)
    ]
    assert not found, "tests write to tmp_path; pictures for the README go through .ci/pictures.sh:\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(("variable", "test_file", "picture"), PICTURES)
def test_pictures_script_points_each_picture_test_at_the_readmes_file(
    variable: str, test_file: str, picture: str
) -> None:
    script = SCRIPT.read_text()
    assert script.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in script
    assert f'{variable}="$PWD/{picture}"' in script and test_file in script
    assert f'os.environ.get("{variable}") or tmp_path' in (ROOT / test_file).read_text()  # the tmp_path default
    assert f"({picture})" in (ROOT / "README.md").read_text()  # the picture the README shows
