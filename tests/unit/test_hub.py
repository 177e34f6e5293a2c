"""Token resolution and Hub access checks, against a fake Hub served on 127.0.0.1.

The fake Hub answers ``GET /api/models/<repo>/auth-check`` the way huggingface.co does: status code
plus the ``X-Error-Code`` / ``X-Error-Message`` headers that ``huggingface_hub`` parses into
``GatedRepoError`` / ``RepositoryNotFoundError``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest
from pydantic import SecretStr

from corolla.engine.errors import (
    AccessNotGrantedError,
    HubAccessError,
    ModelNotFoundError,
    NotLoggedInError,
    OfflineNotCachedError,
)
from corolla.engine.hub import check_model_access, resolve_token

GRANTED = "hf_fakeGrantedToken0123456789"
DENIED = "hf_fakeDeniedToken0123456789"
PUBLIC = "acme/public-model"
GATED = "acme/gated-model"
MISSING = "acme/no-such-model"


@dataclass
class FakeHub:
    """A fake Hub on 127.0.0.1: its URL and (path, Authorization header) of each repo request it got."""

    url: str
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _answer(path: str, auth: str | None) -> tuple[int, dict[str, str]]:
    """What huggingface.co answers to an auth-check (status, headers); 200 means access."""
    prefix, suffix = "/api/models/", "/auth-check"
    if not (path.startswith(prefix) and path.endswith(suffix)):
        return 404, {"X-Error-Message": "Not Found"}
    repo = path[len(prefix) : -len(suffix)]
    token = auth.removeprefix("Bearer ") if auth else None
    if token is not None and token not in (GRANTED, DENIED):
        return 401, {"X-Error-Message": "Invalid credentials in Authorization header"}
    if repo == PUBLIC:
        return 200, {}
    if repo == GATED:
        if token is None:
            message = (
                f"Access to model {repo} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in."
            )
            return 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": message}
        if token == DENIED:
            message = (
                f"Access to model {repo} is restricted and you are not in the authorized list. "
                f"Visit https://huggingface.co/{repo} to ask for access."
            )
            return 403, {"X-Error-Code": "GatedRepo", "X-Error-Message": message}
        return 200, {}
    # The real Hub answers 401 to anonymous requests for missing repos (it won't say if a private one exists).
    message = "Repository not found"
    return (401 if token is None else 404), {"X-Error-Code": "RepoNotFound", "X-Error-Message": message}


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """Serve a fake Hub on 127.0.0.1 and point huggingface_hub at it (HF_ENDPOINT is read at import)."""
    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            if self.path.startswith("/api/models/"):  # not huggingface_hub's own housekeeping requests
                seen.append((self.path, auth))
            status, headers = _answer(self.path, auth)
            body = json.dumps({"error": headers.get("X-Error-Message", "")} if status != 200 else {}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub = FakeHub(url=f"http://127.0.0.1:{server.server_port}", requests=seen)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_saved_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No HF_TOKEN and an empty token file: returns where `hf auth login` would save a token."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    token_path = tmp_path / "token"
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(token_path))
    return token_path


# --- resolve_token ---------------------------------------------------------------------------------


def test_explicit_token_wins(no_saved_token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    no_saved_token.write_text("hf_saved")
    assert resolve_token("hf_explicit") == "hf_explicit"
    assert resolve_token(SecretStr("hf_secret")) == "hf_secret"


def test_env_token_then_saved_token(no_saved_token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_saved_token.write_text("hf_saved\n")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert resolve_token(None) == "hf_from_env"
    assert resolve_token("") == "hf_from_env"
    assert resolve_token(SecretStr("")) == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    assert resolve_token(None) == "hf_saved"


def test_no_token_anywhere(no_saved_token: Path) -> None:
    assert resolve_token(None) is None


# --- check_model_access: the four Hub cases --------------------------------------------------------


def test_public_repo_needs_no_token(fake_hub: FakeHub) -> None:
    check_model_access(PUBLIC, None)
    assert fake_hub.requests == [(f"/api/models/{PUBLIC}/auth-check", None)]


def test_gated_repo_with_granted_token(fake_hub: FakeHub) -> None:
    check_model_access(GATED, GRANTED)
    assert fake_hub.requests == [(f"/api/models/{GATED}/auth-check", f"Bearer {GRANTED}")]


def test_gated_repo_without_token_says_how_to_log_in(fake_hub: FakeHub) -> None:
    with pytest.raises(NotLoggedInError) as info:
        check_model_access(GATED, None)
    message = str(info.value)
    assert "token=" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert fake_hub.requests[0][1] is None, "no token may be sent when none was resolved"


def test_gated_repo_not_granted_names_model_page(fake_hub: FakeHub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(AccessNotGrantedError) as info:
        check_model_access(GATED, DENIED)
    message = str(info.value)
    assert f"{fake_hub.url}/{GATED}" in message
    assert "Request access" in message
    assert DENIED not in message and DENIED not in caplog.text
    assert isinstance(info.value, HubAccessError)


def test_invalid_token(fake_hub: FakeHub) -> None:
    with pytest.raises(NotLoggedInError) as info:
        check_model_access(GATED, "hf_revoked_token")
    assert "invalid or expired" in str(info.value)
    assert "hf_revoked_token" not in str(info.value)


@pytest.mark.parametrize("token", [None, GRANTED])
def test_missing_repo(fake_hub: FakeHub, token: str | None) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        check_model_access(MISSING, token)
    assert MISSING in str(info.value) and "spelling" in str(info.value)


def test_offline_with_nothing_cached(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineNotCachedError) as info:
        check_model_access(GATED, GRANTED, cache_dir=tmp_path)
    assert "HF_HUB_OFFLINE" in str(info.value) and GATED in str(info.value)
    assert fake_hub.requests == [], "offline mode must not touch the network"


def test_offline_with_cached_model(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repo_dir = tmp_path / f"models--{GATED.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0" * 40)
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model_access(GATED, None, cache_dir=tmp_path)
    assert fake_hub.requests == []


def test_local_folder_is_not_checked(fake_hub: FakeHub, tmp_path: Path) -> None:
    check_model_access(str(tmp_path), None)
    assert fake_hub.requests == []


def test_unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(HubAccessError) as info:
        check_model_access(GATED, None, cache_dir=tmp_path)
    assert "HF_HUB_OFFLINE=1" in str(info.value)


@pytest.mark.timeout(240)  # two fresh interpreters importing transformers: slow on a loaded 2-core box
def test_hf_endpoint_and_hf_token_env_in_fresh_process(fake_hub: FakeHub, tmp_path: Path) -> None:
    """HF_ENDPOINT is read by huggingface_hub at import: a fresh process sees the fake Hub through it."""
    script = (
        "from corolla.engine.hub import check_model_access, resolve_token\n"
        "from corolla.engine.errors import AccessNotGrantedError\n"
        f"check_model_access({GATED!r}, resolve_token(None))\n"
        "print('granted')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path), HF_TOKEN=GRANTED)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "granted"

    env["HF_TOKEN"] = DENIED
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode != 0
    assert "AccessNotGrantedError" in done.stderr and f"{fake_hub.url}/{GATED}" in done.stderr
    assert DENIED not in done.stderr
    assert fake_hub.requests[-1] == (f"/api/models/{GATED}/auth-check", f"Bearer {DENIED}")


# ---- the server's token and Hub errors ------------------------------------------------------
def test_read_token_file(tmp_path: Path) -> None:
    from corolla.engine.hub import read_token_file

    (tmp_path / "token").write_text(f"\n  {GRANTED}  \nignored\n")
    assert read_token_file(tmp_path / "token") == GRANTED
    (tmp_path / "empty").write_text("\n \n")
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read the token file"):
        read_token_file(tmp_path / "missing")
    (tmp_path / "big").write_text("x" * 10_000)
    with pytest.raises(ValueError, match="larger than a token file"):
        read_token_file(tmp_path / "big")


def run_server(args: list[str], hub_url: str, home: Path, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """``corolla server ARGS --new-swarm`` in a fresh process against the fake Hub; it must fail before serving."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "COROLLA_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), COROLLA_NO_PROGRESS="1", **env_vars)
    command = [sys.executable, "-m", "corolla.engine.apps.cli", "server", *args, "--new-swarm"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=200)


@pytest.mark.timeout(240)
def test_server_refuses_a_token_on_the_command_line(fake_hub: FakeHub, tmp_path: Path) -> None:
    done = run_server([GATED, "--token", GRANTED], fake_hub.url, tmp_path)
    assert done.returncode == 2
    assert "--token-file PATH" in done.stderr and "HF_TOKEN" in done.stderr and "ps" in done.stderr
    assert not fake_hub.requests  # refused before anything was sent


@pytest.mark.timeout(600)
def test_server_reads_its_token_from_a_file_or_the_environment(fake_hub: FakeHub, tmp_path: Path) -> None:
    token_file = tmp_path / "hf-token"
    token_file.write_text(DENIED + "\n")
    done = run_server([GATED, "--token-file", str(token_file)], fake_hub.url, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "has not been granted access to the gated model" in done.stderr and "Traceback" not in done.stderr
    assert DENIED not in done.stderr
    assert fake_hub.requests[-1] == (f"/api/models/{GATED}/auth-check", f"Bearer {DENIED}")

    done = run_server([GATED], fake_hub.url, tmp_path, COROLLA_TOKEN=DENIED)
    assert "has not been granted access" in done.stderr
    assert fake_hub.requests[-1] == (f"/api/models/{GATED}/auth-check", f"Bearer {DENIED}")

    done = run_server([GATED, "--token-file", str(tmp_path / "nope")], fake_hub.url, tmp_path)
    assert done.returncode == 2 and "cannot read the token file" in done.stderr


@pytest.mark.timeout(600)
def test_server_hub_errors_are_clear_messages(fake_hub: FakeHub, tmp_path: Path) -> None:
    done = run_server([MISSING], fake_hub.url, tmp_path)
    assert done.returncode == 2
    assert f"Model {MISSING} was not found on the Hugging Face Hub" in done.stderr, done.stderr
    done = run_server([GATED], fake_hub.url, tmp_path)
    assert "is a gated model and needs a Hugging Face token" in done.stderr and "--token-file" in done.stderr
    done = run_server([GATED], fake_hub.url, tmp_path, HF_HUB_OFFLINE="1")
    assert "Offline mode is on (HF_HUB_OFFLINE=1)" in done.stderr
    done = run_server([GATED], "http://127.0.0.1:9", tmp_path)
    assert "Could not reach the Hugging Face Hub" in done.stderr and "Traceback" not in done.stderr
