"""Initial peer addresses are checked offline; model arguments that look local are told apart from repo ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from corolla.engine import CorollaError
from corolla.engine.dht.peers import check_initial_peers, tcp_endpoint
from corolla.engine.errors import InitialPeerError, MissingBlocksError
from corolla.engine.models.checkpoint import Checkpoint
from corolla.engine.models.source import check_model_source, is_repo_id, looks_local, model_id

GOOD = "/ip4/1.2.3.4/tcp/31337/p2p/12D3KooWHLv39SijqzvDRYcyWSj8Bs31gYevLimkDLtRi9wi7Bmb"


def test_good_peers_pass() -> None:
    check_initial_peers([GOOD, "/dns4/example.com/tcp/1/p2p/QmXzR5HoFVPjp7jRDhH3XgvKcCSv4ABsFfHTqhPzc4uF4h"])
    check_initial_peers([])


@pytest.mark.parametrize("bad", ["garbage", "/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/1/p2p/xyz", "/ip4/999.1.1.1/tcp/1"])
def test_the_bad_peer_is_named(bad: str) -> None:
    with pytest.raises(InitialPeerError) as info:
        check_initial_peers([GOOD, bad])
    assert info.value.peers == (bad,)
    assert repr(bad) in str(info.value)


def test_tcp_endpoint() -> None:
    assert tcp_endpoint(GOOD) == ("1.2.3.4", 31337)
    assert tcp_endpoint("/ip4/1.2.3.4/udp/1/quic") is None
    assert tcp_endpoint("garbage") is None


@pytest.mark.parametrize("name", ["/abs/path", "./rel", "../up", "~/home", "C:\\models\\x"])
def test_paths_look_local(name: str) -> None:
    assert looks_local(name)


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "meta-llama/Llama-3.1-8B"])
def test_repo_ids_do_not_look_local(name: str) -> None:
    assert not looks_local(name)


def test_relative_path_under_an_existing_folder_looks_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_local("models/llama")
    with pytest.raises(CorollaError, match="models/llama: no such folder"):
        Checkpoint("models/llama")


def test_missing_folder_is_a_clear_error_at_once() -> None:
    with pytest.raises(CorollaError, match=r"/no/such/folder: no such folder\. Give a folder holding config\.json"):
        Checkpoint("/no/such/folder")


def test_home_folder_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert Checkpoint("~/ckpt").local_dir == tmp_path / "ckpt"


def test_a_folder_without_config_json_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(
        CorollaError, match=r"the folder has no config\.json, so it is not a checkpoint\. Give a folder"
    ):
        Checkpoint(str(tmp_path))


@pytest.mark.parametrize("name", ["not a model", "owner/name/extra", "bad..name", "-x", "a" * 97])
def test_a_name_that_is_no_repo_id_is_refused(name: str) -> None:
    assert not is_repo_id(name)
    with pytest.raises(CorollaError, match="neither a folder here nor a Hugging Face repo id"):
        check_model_source(name)


def test_model_ids_people_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    assert model_id(str(tmp_path / "SmolLM2-135M-Instruct")) == "SmolLM2-135M-Instruct"
    monkeypatch.chdir(tmp_path / "SmolLM2-135M-Instruct")
    assert model_id(".") == "SmolLM2-135M-Instruct"


def test_missing_blocks_hint_serves_the_source_the_user_gave() -> None:
    error = MissingBlocksError("tiny-llama", [3, 4, 5])
    assert "corolla server tiny-llama --blocks 3:6" in str(error)
    with_source = error.with_source("/data/models/tiny-llama")
    assert "of tiny-llama" in str(with_source)
    assert "corolla server /data/models/tiny-llama --blocks 3:6" in str(with_source)
    assert (with_source.model, with_source.blocks, with_source.source) == (
        "tiny-llama",
        [3, 4, 5],
        "/data/models/tiny-llama",
    )


def test_from_pretrained_refuses_an_empty_folder_before_joining(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hivemind

    from corolla.engine import DistributedModelForCausalLM

    started: list[object] = []
    monkeypatch.setattr(hivemind.DHT, "run_in_background", lambda *a, **k: started.append(a))
    with pytest.raises(CorollaError, match=r"the folder has no config\.json"):
        DistributedModelForCausalLM.from_pretrained(str(tmp_path), initial_peers=[GOOD])
    assert not started, "the DHT process was started"
