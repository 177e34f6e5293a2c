"""The client's settings (where its peers come from) and its local part as a torch module, offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from corolla.engine.client.model import client_config
from corolla.engine.config import ClientConfig
from corolla.engine.models.checkpoint import Checkpoint, ClientHead, load_client_head

ENV_PEERS = "/ip4/127.0.0.1/tcp/4001/p2p/QmEnvA /ip4/127.0.0.1/tcp/4002/p2p/QmEnvB"
ARG_PEER = "/ip4/127.0.0.1/tcp/5001/p2p/QmArg"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("COROLLA_") and name != "COROLLA_NO_PROGRESS":
            monkeypatch.delenv(name)


# ---- COROLLA_INITIAL_PEERS -----------------------------------------------------------------------


@pytest.mark.parametrize("default", [None, (), []])
def test_env_peers_win_over_the_empty_default(monkeypatch: pytest.MonkeyPatch, default: object) -> None:
    monkeypatch.setenv("COROLLA_INITIAL_PEERS", ENV_PEERS)
    assert client_config(default).initial_peers == tuple(ENV_PEERS.split())  # type: ignore[arg-type]


@pytest.mark.parametrize("given", [[ARG_PEER], (ARG_PEER,), ARG_PEER])
def test_given_peers_win_over_the_env(monkeypatch: pytest.MonkeyPatch, given: object) -> None:
    monkeypatch.setenv("COROLLA_INITIAL_PEERS", ENV_PEERS)
    assert client_config(given).initial_peers == (ARG_PEER,)  # type: ignore[arg-type]


def test_no_peers_anywhere_stays_empty() -> None:
    assert client_config(None).initial_peers == ()


def test_other_env_fields_and_overrides_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_INITIAL_PEERS", ENV_PEERS)
    monkeypatch.setenv("COROLLA_STEP_TIMEOUT", "7")
    cfg = client_config(None, max_retries=3)
    assert (cfg.step_timeout, cfg.max_retries, len(cfg.initial_peers)) == (7.0, 3, 2)


def test_a_given_config_keeps_its_peers_unless_peers_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COROLLA_INITIAL_PEERS", ENV_PEERS)
    mine = ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/6001/p2p/QmCfg",), step_timeout=3.0)
    assert client_config(None, mine) == mine  # a full config is taken as it is, not re-read from the env
    assert client_config([ARG_PEER], mine).initial_peers == (ARG_PEER,)
    assert client_config(None, mine, max_retries=1).max_retries == 1
    with pytest.raises(TypeError):
        client_config(None, mine, no_such_option=1)


def test_unknown_overrides_are_refused() -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        client_config(None, no_such_option=1)


# ---- the local head as a torch module ------------------------------------------------------------


def head_of(path: Path) -> ClientHead:
    ckpt = Checkpoint(str(path))
    return load_client_head(ckpt, ckpt.config(), torch.float32)


def test_head_registers_embeddings_norm_and_lm_head(tiny_checkpoint: Callable[..., Path]) -> None:
    head = head_of(tiny_checkpoint("llama"))
    assert isinstance(head, nn.Module)
    names = {name for name, _ in head.named_parameters()}
    assert names == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    assert head.lm_head.weight.data_ptr() != head.embed_tokens.weight.data_ptr()


def test_tied_embeddings_stay_tied_through_casts_and_moves(tiny_checkpoint: Callable[..., Path]) -> None:
    head = head_of(tiny_checkpoint("llama", tie_word_embeddings=True))
    assert head.lm_head.weight is head.embed_tokens.weight
    assert {name for name, _ in head.named_parameters()} == {"embed_tokens.weight", "norm.weight"}  # one matrix
    head.to(torch.float64).to("cpu")
    assert head.lm_head.weight is head.embed_tokens.weight
    assert head.lm_head.weight.dtype == torch.float64
    with torch.no_grad():
        head.embed_tokens.weight[5, 0] = 123.0
    assert float(head.lm_head.weight.detach()[5, 0]) == 123.0
    hidden = torch.randn(1, 3, int(head.embed_tokens.weight.shape[1]), dtype=torch.float64)
    assert head.logits(hidden).dtype == torch.float32  # logits are float32 whatever the head's dtype
