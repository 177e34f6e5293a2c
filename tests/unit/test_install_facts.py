"""The install instructions agree with what CI installs: constraints, extras, apt packages, torch index."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", spec)
    assert match, spec
    return norm(match[0])


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line)
        if match:
            pins[norm(match[1])] = match[2]
    return pins


def test_constraints_pin_every_declared_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra, specs in project["optional-dependencies"].items():
        if extra != "agent":  # platform-specific (PyGObject on Linux only): pinned, but not required everywhere
            declared += specs
    pins = pinned()
    missing = sorted({requirement_name(spec) for spec in declared} - set(pins) - {"corolla"})
    assert not missing, f"constraints.txt lacks {missing}: run .ci/freeze.sh after installing them"
    assert not [v for v in pins.values() if "+" in v], "local versions (+cpu) don't exist on other indexes"


def test_readme_commands_use_the_tested_set_and_cpu_torch() -> None:
    readme = (ROOT / "README.md").read_text()
    demo = next(
        line for line in readme.splitlines() if line.endswith('corolla demo --prompt "What is the capital of France?"')
    )
    assert "-c constraints.txt" in demo
    assert f"torch=={pinned()['torch']} --extra-index-url https://download.pytorch.org/whl/cpu" in demo
    assert "bash .ci/run" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci


def test_readme_apt_line_is_part_of_the_ci_system_packages() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"sudo apt install ([^`]+)`", readme)
    assert match, "README has no apt line for the agent"
    wanted = set(match[1].split())
    script = (ROOT / ".ci" / "system-deps.sh").read_text()
    ci_packages = {p for line in re.findall(r"^ {4}([^#\n]+)$", script, flags=re.M) for p in line.split()}
    assert wanted <= ci_packages, f"README asks for {sorted(wanted - ci_packages)}, which CI never installs"


def test_transformers_floor_is_what_ci_tests() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(s for s in project["dependencies"] if requirement_name(s) == "transformers")
    assert re.fullmatch(r"transformers>=\d+\.\d+\.\d+,<6", spec), spec
    ci = (ROOT / ".ci" / "run").read_text()
    assert "transformers>=" in ci and "compat.sh" in ci
