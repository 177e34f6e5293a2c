"""The web faces (``corolla api``, ``corolla monitor`` and their shared start-up, ``apps/web.py``) sit above
the core: nothing else in the engine imports them, and their libraries (FastAPI, uvicorn,
prometheus-client) load only when they run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_layout import REPO, imported_modules

pytestmark = pytest.mark.timeout(120)

FACES = ("corolla.engine.apps.api", "corolla.engine.apps.monitor", "corolla.engine.apps.web")
FACE_PATHS = (Path("apps/api"), Path("apps/monitor"), Path("apps/web.py"))
WEB_LIBRARIES = ("fastapi", "starlette", "uvicorn", "prometheus_client")


def test_only_the_cli_and_the_faces_import_the_faces() -> None:
    offenders: dict[str, list[str]] = {}
    for path in (REPO / "engine").rglob("*.py"):
        rel = path.relative_to(REPO / "engine")
        if "__pycache__" in path.parts or rel == Path("apps/cli.py") or any(rel.is_relative_to(f) for f in FACE_PATHS):
            continue
        bad = sorted(m for m in imported_modules(path) if m.startswith(FACES) or m.split(".")[0] in WEB_LIBRARIES)
        if bad:
            offenders[str(rel)] = bad
    assert offenders == {}


def test_web_libraries_load_only_when_a_face_runs(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "import corolla.engine, corolla.engine.apps.cli\n"
        "corolla.engine.apps.cli.build_parser().parse_args(['api', 'm', '--initial-peers', 'x'])\n"
        "import corolla.engine.apps.api.protocol, corolla.engine.apps.api.errors, corolla.engine.apps.monitor.state\n"
        "import corolla.engine.apps.web, corolla.engine.apps.api.serve, corolla.engine.apps.monitor.serve\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {WEB_LIBRARIES!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
