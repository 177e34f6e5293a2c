"""The ``corolla`` command line as a user meets it: version, log level anywhere, sizes, defaults, clear errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import corolla.engine.apps.cli as cli
from corolla.engine.config import ServerConfig
from corolla.engine.version import __version__

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("COROLLA_") and name != "COROLLA_NO_PROGRESS":
            monkeypatch.delenv(name)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """``corolla server`` with a fake Server that only records its config."""
    configs: list[ServerConfig] = []

    class FakeServer:
        def __init__(self, cfg: ServerConfig) -> None:
            configs.append(cfg)

        def run(self) -> None:
            pass

    import corolla.engine.server.server as server_module

    monkeypatch.setattr(server_module, "Server", FakeServer)
    return configs


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures the ``corolla`` logger; leave it as the other tests expect."""
    logger = logging.getLogger("corolla")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m corolla.engine.apps.cli ARGS`` in a fresh process (exit codes and stderr as a user sees them)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COROLLA_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "corolla.engine.apps.cli", *args],
        capture_output=True,
        text=True,
        timeout=100,
        env=full_env,
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"corolla {__version__}"


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        (["--log-level", "debug", "server", "m", "--new-swarm"], logging.DEBUG),
        (["server", "m", "--new-swarm", "--log-level", "Warning"], logging.WARNING),
        (["server", "--log-level=ERROR", "m", "--new-swarm"], logging.ERROR),
        (["--log-level", "debug", "server", "m", "--new-swarm", "--log-level", "info"], logging.INFO),  # last wins
        (["server", "m", "--new-swarm"], logging.INFO),
    ],
)
def test_log_level_anywhere_in_any_case(captured: list[ServerConfig], argv: list[str], level: int) -> None:
    assert cli.main(argv) == 0
    assert logging.getLogger("corolla").level == level
    assert captured and captured[0].model == "m"


def test_log_level_from_env_in_any_case(captured: list[ServerConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_LOG_LEVEL", "warning")
    assert cli.main(["server", "m", "--new-swarm"]) == 0
    assert logging.getLogger("corolla").level == logging.WARNING


def test_bad_log_level_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["server", "m", "--log-level", "loud"])
    assert info.value.code == 2
    assert "'loud' is not one of DEBUG, INFO" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "expected"), [("1GB", 10**9), ("512MiB", 512 * 2**20), ("123456", 123456)])
def test_cache_bytes_takes_human_sizes(captured: list[ServerConfig], given: str, expected: int) -> None:
    assert cli.main(["server", "m", "--new-swarm", "--cache-bytes", given]) == 0
    assert captured[0].cache_bytes == expected


def test_bad_size_is_a_usage_error_naming_the_forms(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["server", "m", "--new-swarm", "--cache-bytes", "1XB"])
    assert info.value.code == 2
    assert "not a size: '1XB'" in capsys.readouterr().err


def test_bad_size_in_env_is_a_message_not_a_traceback(
    captured: list[ServerConfig], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COROLLA_CACHE_BYTES", "a lot")
    assert cli.main(["server", "m", "--new-swarm"]) == 2
    assert "COROLLA_CACHE_BYTES: not a size" in capsys.readouterr().err
    assert not captured


def test_server_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["server", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 512MiB)" in out  # cache_bytes, in a human size
    assert "(default: 8192)" in out  # max_length
    assert "else 127.0.0.1" in out  # host: automatic
    assert "(default: 30.0)" in out  # announce_period
    assert "--log-level" in out


def test_missing_local_folder_says_no_such_folder_in_a_real_process() -> None:
    result = run_cli("server", "/no/such/folder", "--new-swarm")
    assert result.returncode == 2, result.stderr
    assert "/no/such/folder: no such folder" in result.stderr
    assert "Traceback" not in result.stderr and "Repo id" not in result.stderr


@pytest.mark.parametrize("path", ["./no-such-folder", "~/no-such-folder-corolla"])
def test_missing_local_folder_says_no_such_folder(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["server", path, "--new-swarm"])
    assert info.value.code == 2
    assert f"{path}: no such folder" in capsys.readouterr().err


def test_a_file_is_not_a_checkpoint_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "model.bin"
    file.write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        cli.main(["server", str(file), "--new-swarm"])
    assert info.value.code == 2
    assert "is a file, not a checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("peer", "message"),
    [
        ("garbage", "bad initial peer address 'garbage'"),
        ("/ip4/300.1.1.1/tcp/1/p2p/12D3KooWHLv39SijqzvDRYcyWSj8Bs31gYevLimkDLtRi9wi7Bmb", "is not IPv4"),
        ("/ip4/127.0.0.1/tcp/31337", "lacks the peer id"),
    ],
)
def test_bad_multiaddr_is_rejected_before_the_daemon_starts(
    peer: str, message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "configure_logging", lambda level=None: None)
    import hivemind

    started: list[object] = []
    monkeypatch.setattr(hivemind.DHT, "run_in_background", lambda *a, **k: started.append(a))
    assert cli.main(["health", "--initial-peers", peer]) == 2
    err = capsys.readouterr().err
    assert message in err and peer in err
    assert not started, "the DHT process was started"


def test_health_reads_initial_peers_from_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "configure_logging", lambda level=None: None)
    monkeypatch.setenv("COROLLA_INITIAL_PEERS", "not-a-multiaddr")
    assert cli.main(["health"]) == 2
    assert "bad initial peer address 'not-a-multiaddr'" in capsys.readouterr().err  # it used the env value


def test_health_without_any_peers_says_how_to_give_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["health"]) == 2
    err = capsys.readouterr().err
    assert "--initial-peers" in err and "COROLLA_INITIAL_PEERS" in err


PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWHLv39SijqzvDRYcyWSj8Bs31gYevLimkDLtRi9wi7Bmb"


def assert_refused(result: subprocess.CompletedProcess[str], *advice: str) -> None:
    """Refused at its arguments: exit 2, one line of stderr with the advice, nothing started, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in advice:
        assert text in lines[0], lines[0]
    assert not result.stdout


def run_refused(*args: str) -> subprocess.CompletedProcess[str]:
    """A command that must stop at its arguments: it gets 30 s, far less than starting anything takes."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("COROLLA_")}
    return subprocess.run(
        [sys.executable, "-m", "corolla.engine.apps.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
    )


@pytest.mark.parametrize("command", [["server", "{}", "--new-swarm"], ["api", "{}", "--initial-peers", PEER]])
def test_a_folder_without_config_json_is_refused_before_anything_starts(command: list[str], tmp_path: Path) -> None:
    result = run_refused(*(arg.format(tmp_path) for arg in command))
    assert_refused(result, f"{tmp_path}: the folder has no config.json", "Give a folder holding config.json")


@pytest.mark.parametrize("name", ["not a model", "a/b/c", "bad..name"])
def test_a_name_that_is_neither_a_folder_nor_a_repo_id_is_refused(name: str) -> None:
    assert_refused(run_refused("server", name, "--new-swarm"), "neither a folder here nor a Hugging Face repo id")


@pytest.mark.parametrize(
    ("args", "advice"),
    [
        (["demo", "--prompt", ""], "--prompt: is empty: give a question"),
        (["demo", "--prompt", "  \t"], "--prompt: is empty"),
        (["demo", "--max-new-tokens", "-5"], "--max-new-tokens: must be at least 1 (got -5)"),
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1 (got 0)"),
        (["demo", "--servers", "0"], "--servers: must be at least 1 (got 0)"),
        (["demo", "--max-new-tokens", "many"], "--max-new-tokens: expected an integer, got 'many'"),
        (["api", "m", "--default-max-tokens", "-5"], "--default-max-tokens: must be at least 1 (got -5)"),
        (["api", "m", "--max-sessions", "0"], "--max-sessions: must be at least 1"),
        (["api", "m", "--request-timeout", "0"], "--request-timeout: must be more than 0"),
        (["api", "m", "--port", "70000"], "--port: must be from 1 to 65535"),
        (["api", "m", "--model-name", " "], "--model-name: is empty"),
        (["monitor", "--refresh", "-1"], "--refresh: must be more than 0"),
        (["server", "m", "--new-swarm", "--max-length", "0"], "--max-length: must be at least 1"),
        (["server", "m", "--new-swarm", "--balance-quality", "2"], "--balance-quality: must be from 0 to 1"),
        (["health", "--num-blocks", "0"], "--num-blocks: must be at least 1"),
    ],
)
def test_bad_values_are_refused_in_one_line(args: list[str], advice: str) -> None:
    assert_refused(run_refused(*args), advice, f"see `corolla {args[0]} --help`")


def test_a_bad_config_value_from_the_environment_is_one_line(
    captured: list[ServerConfig], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COROLLA_MAX_LENGTH", "0")
    assert cli.main(["server", "m", "--new-swarm"]) == 2
    assert "max_length must be at least 1 (got 0)" in capsys.readouterr().err
    assert not captured


@pytest.mark.parametrize("command", [["api", "m", "--initial-peers", PEER], ["monitor", "--initial-peers", PEER]])
def test_a_port_in_use_is_refused_before_anything_starts(command: list[str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_refused(*command, "--port", str(port))
    assert_refused(result, f"port {port} on 127.0.0.1 is in use: pick another with --port")
