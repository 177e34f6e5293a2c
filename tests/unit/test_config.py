"""Config objects: defaults, COROLLA_* environment, overrides, span parsing, and the generated CLI."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path

import pytest

import corolla.engine.apps.cli as cli
from corolla.engine.config import ClientConfig, ServerConfig, as_tuple, format_size, from_env, parse_size, parse_span

CLI_SKIPPED = {"model", "extra", "token"}  # positional / not a flag / given as its own --token


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("COROLLA_") and name != "COROLLA_NO_PROGRESS":
            monkeypatch.delenv(name)


def test_defaults_without_env() -> None:
    assert from_env(ServerConfig) == ServerConfig()
    assert from_env(ClientConfig) == ClientConfig()


def test_from_env_reads_typed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_MAX_LENGTH", "1234")
    monkeypatch.setenv("COROLLA_ANNOUNCE_PERIOD", "2.5")
    monkeypatch.setenv("COROLLA_NEW_SWARM", "yes")
    monkeypatch.setenv("COROLLA_NAT_PORT_MAP", "0")
    monkeypatch.setenv("COROLLA_INITIAL_PEERS", "/ip4/1.2.3.4/tcp/1/p2p/A, /ip4/5.6.7.8/tcp/2/p2p/B")
    monkeypatch.setenv("COROLLA_DTYPE", "float16")
    monkeypatch.setenv("COROLLA_BLOCKS", "3:7")
    monkeypatch.setenv("COROLLA_NUM_BLOCKS", "4")
    monkeypatch.setenv("COROLLA_NOT_A_FIELD", "ignored")
    cfg = from_env(ServerConfig)
    assert cfg.max_length == 1234 and type(cfg.max_length) is int
    assert cfg.announce_period == 2.5 and type(cfg.announce_period) is float
    assert cfg.new_swarm is True
    assert cfg.nat_port_map is False
    assert cfg.initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/5.6.7.8/tcp/2/p2p/B")
    assert cfg.dtype == "float16"
    assert cfg.blocks == "3:7"
    assert cfg.num_blocks == 4 and type(cfg.num_blocks) is int


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False)])
def test_bool_env_values(monkeypatch: pytest.MonkeyPatch, text: str, expected: bool) -> None:
    monkeypatch.setenv("COROLLA_NAT_PORT_MAP", text)
    assert from_env(ClientConfig).nat_port_map is expected


def test_overrides_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_STEP_TIMEOUT", "5")
    monkeypatch.setenv("COROLLA_MAX_RETRIES", "2")
    cfg = from_env(ClientConfig, step_timeout=7.0, max_retries=None)
    assert cfg.step_timeout == 7.0
    assert cfg.max_retries == 2  # None means "not given": the env value stays


@pytest.mark.parametrize("peers", ["/ip4/1/tcp/2/p2p/A", ["/ip4/1/tcp/2/p2p/A"], ("/ip4/1/tcp/2/p2p/A",)])
def test_initial_peers_become_a_tuple(peers: object) -> None:
    assert from_env(ClientConfig, initial_peers=peers).initial_peers == ("/ip4/1/tcp/2/p2p/A",)


def test_unknown_option_raises_type_error() -> None:
    with pytest.raises(TypeError, match="max_lenght"):
        from_env(ServerConfig, max_lenght=5)
    with pytest.raises(TypeError, match="ClientConfig"):
        from_env(ClientConfig, cache_bytes=5)


def test_configs_are_frozen() -> None:
    cfg = ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_length = 1  # type: ignore[misc]


def test_token_is_not_in_repr() -> None:
    assert "hf_secret" not in repr(ServerConfig(token="hf_secret"))


@pytest.mark.parametrize(
    ("text", "total", "expected"), [("0:3", None, (0, 3)), ("3:6", 6, (3, 6)), (" 2 : 5 ", None, (2, 5))]
)
def test_parse_span(text: str, total: int | None, expected: tuple[int, int]) -> None:
    assert parse_span(text, total) == expected


@pytest.mark.parametrize(
    ("text", "total"),
    [("3", None), ("a:b", None), ("0:3:5", None), ("", None), ("3:3", None), ("4:2", None), ("-1:2", None), ("0:7", 6)],
)
def test_parse_span_errors(text: str, total: int | None) -> None:
    with pytest.raises(ValueError, match="blocks"):
        parse_span(text, total)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1GB", 10**9),
        ("512MiB", 512 * 2**20),
        ("512mib", 512 * 2**20),
        ("1.5 GiB", 3 * 2**29),
        ("2kb", 2000),
        ("1048576", 2**20),
        (" 7B ", 7),
        ("1TiB", 2**40),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "1XB", "-1", "1e9", "1 G B", "one GB"])
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a size.*1GB"):
        parse_size(text)


@pytest.mark.parametrize(("num", "text"), [(512 * 2**20, "512MiB"), (10**9, "1GB"), (2**30, "1GiB"), (1001, "1001")])
def test_format_size_is_exact_and_round_trips(num: int, text: str) -> None:
    assert format_size(num) == text
    assert parse_size(format_size(num)) == num


def test_byte_fields_take_human_sizes_from_env_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_CACHE_BYTES", "1GB")
    monkeypatch.setenv("COROLLA_MAX_CHUNK_BYTES", "1MiB")
    assert from_env(ServerConfig).cache_bytes == 10**9
    assert from_env(ClientConfig).max_chunk_bytes == 2**20
    assert from_env(ServerConfig, cache_bytes="256MiB").cache_bytes == 256 * 2**20
    monkeypatch.setenv("COROLLA_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="COROLLA_CACHE_BYTES: not a size"):
        from_env(ServerConfig)


def test_as_tuple() -> None:
    assert as_tuple(None) == ()
    assert as_tuple("a") == ("a",)
    assert as_tuple(["a", "b"]) == ("a", "b")


# ---- CLI generated from ServerConfig ------------------------------------------------------------


def server_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["server"]


def test_server_options_are_the_config_fields() -> None:
    parser = server_parser()
    options = {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    fields = {f.name for f in dataclasses.fields(ServerConfig)} - CLI_SKIPPED
    assert options == {"--" + name.replace("_", "-") for name in fields} | {
        "--help",
        "--token",
        "--token-file",
        "--log-level",
        "--swarm-key",  # the short spelling of --swarm-key-file
    }


def test_server_help_comes_from_the_field_comments(capsys: pytest.CaptureFixture[str]) -> None:
    source = inspect.getsource(ServerConfig)
    parser = server_parser()
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(ServerConfig):
        if f.name in CLI_SKIPPED:
            continue
        help_text = by_dest[f.name].help
        assert help_text, f"--{f.name} has no help"
        line = next(line for line in source.splitlines() if line.strip().startswith(f"{f.name}:"))
        comment = line.split("#", 1)[1].strip()
        assert help_text.startswith(comment), f.name
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["server", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(ServerConfig):
        if f.name not in CLI_SKIPPED:
            assert "--" + f.name.replace("_", "-") in out


def test_cli_values_are_typed_and_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COROLLA_MAX_LENGTH", "100")
    monkeypatch.setenv("COROLLA_PORT", "4000")
    captured: list[ServerConfig] = []

    class FakeServer:
        def __init__(self, cfg: ServerConfig) -> None:
            captured.append(cfg)

        def run(self) -> None:
            pass

    import corolla.engine.server.server as server_module

    monkeypatch.setattr(server_module, "Server", FakeServer)
    monkeypatch.setattr(cli, "configure_logging", lambda level=None: None)  # keep the test's logging as it is
    argv = ["server", "some/model", "--new-swarm", "--max-length", "5", "--announce-period", "2.5"]
    (tmp_path / "token").write_text("hf_x\n")
    argv += ["--initial-peers", "A", "B", "--token-file", str(tmp_path / "token")]
    assert cli.main(argv) == 0
    (cfg,) = captured
    assert cfg.model == "some/model" and cfg.token == "hf_x"
    assert cfg.new_swarm is True
    assert cfg.max_length == 5  # the flag wins over COROLLA_MAX_LENGTH
    assert cfg.port == 4000  # not given on the command line: env applies
    assert cfg.announce_period == 2.5
    assert cfg.initial_peers == ("A", "B")
    assert cfg.nat_port_map is False  # an absent flag does not force the default over env


def test_cli_server_without_peers_exits_with_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "configure_logging", lambda level=None: None)
    assert cli.main(["server", "some/model"]) == 2
