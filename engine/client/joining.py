"""Joining and leaving the swarm as a client: the DHT, its P2P replica on the client's loop, the routes.

Also the tokenizer a client loads next to its embeddings and head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from corolla.engine.client.context import ClientContext
from corolla.engine.client.credentials import credentials_for
from corolla.engine.client.loop import LoopThread
from corolla.engine.config import ClientConfig, as_tuple, from_env
from corolla.engine.dht.announce import make_dht
from corolla.engine.errors import CorollaError
from corolla.engine.models.checkpoint import Checkpoint, ClientHead, load_client_head
from corolla.engine.routing.sequence_manager import SequenceManager

logger = logging.getLogger(__name__)


def client_config(
    initial_peers: Sequence[str] | str | None = None, config: ClientConfig | None = None, **overrides: Any
) -> ClientConfig:
    """The settings :meth:`DistributedModelForCausalLM.from_pretrained` runs with.

    ``config`` (or the defaults, then ``COROLLA_*`` environment variables) with ``overrides`` applied.
    Given peers win over ``config`` and over ``COROLLA_INITIAL_PEERS``; with none given (None or
    empty), the environment variable or ``config`` supplies them.
    """
    config = from_env(ClientConfig, **overrides) if config is None else dataclasses.replace(config, **overrides)
    peers = as_tuple(initial_peers)
    return dataclasses.replace(config, initial_peers=peers) if peers else config


def join_swarm(
    config: ClientConfig, model_name: str, num_blocks: int, model_ref: str
) -> tuple[Any, LoopThread, Any, SequenceManager]:
    """Start a client DHT peer and its P2P replica; return (dht, loop, p2p, routes of ``model_name``).

    ``model_ref`` is the checkpoint the client was made from (what the routes name in their errors).
    Nothing is left running if any part fails.
    """
    swarm_keys = credentials_for(config).keys  # read the key files before any process starts
    dht = make_dht(
        config.initial_peers,
        config.host,
        client_mode=True,
        nat_port_map=config.nat_port_map,
        swarm_keys=swarm_keys,
    )
    loop = LoopThread()
    try:
        p2p = loop.run(dht.replicate_p2p(), timeout=config.connect_timeout)
        manager = SequenceManager(dht, model_name, num_blocks, config, model_ref)
    except BaseException:
        loop.stop()
        dht.shutdown()
        raise
    return dht, loop, p2p, manager


def release(loop: LoopThread, p2p: Any, dht: Any) -> None:
    """Shut the client's P2P replica down on its own loop, then the loop and the DHT process."""

    async def shutdown() -> None:
        await p2p.shutdown()
        # hivemind's P2P finalizers need a running loop: drop the last references here, on it.
        p2p._client = None
        dht._p2p_replica = None
        gc.collect()

    with contextlib.suppress(Exception):
        loop.run(shutdown(), timeout=5)
    loop.stop()
    dht.shutdown()


def load_tokenizer(
    ckpt: Checkpoint, name: str, token: str | None, revision: str | None
) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer, or None if it ships none (token-level generation still works)."""
    try:
        if ckpt.local_dir is not None:
            return AutoTokenizer.from_pretrained(str(ckpt.local_dir))
        return AutoTokenizer.from_pretrained(name, token=token, revision=revision)
    except (OSError, ValueError) as e:
        logger.warning("no tokenizer for %s (%s): only token-id generation is available", name, e)
        return None


@dataclass(frozen=True)
class ClientParts:
    """What a distributed model is made of: the local parts of its checkpoint and a client of its swarm."""

    model_name: str  # the DHT prefix its servers announce blocks under
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase | None
    head: ClientHead  # embeddings, final norm and LM head, float32, frozen
    context: ClientContext
    dht: Any


def load_client(
    model_name_or_path: str, config: ClientConfig, *, token: str | None, revision: str | None
) -> ClientParts:
    """Load embeddings, head and tokenizer locally and join the swarm that serves the blocks."""
    from corolla.engine.hub import check_model_access, resolve_token

    if not config.initial_peers:
        raise CorollaError(
            "no initial peers: pass initial_peers=[...] (multiaddrs printed by `corolla server --new-swarm`) "
            "or set COROLLA_INITIAL_PEERS"
        )
    token = resolve_token(token)
    ckpt = Checkpoint(model_name_or_path, token=token, revision=revision)
    if not ckpt.is_local:
        check_model_access(model_name_or_path, token)
    hf_config = ckpt.config()
    tokenizer = load_tokenizer(ckpt, model_name_or_path, token, revision)
    head = load_client_head(ckpt, hf_config, torch.float32)
    head.requires_grad_(False)  # the client trains prompts (or what the user unfreezes), never by default
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    model_name = config.dht_prefix or ckpt.default_dht_prefix
    dht, loop, p2p, manager = join_swarm(config, model_name, int(hf_config.num_hidden_layers), model_name_or_path)
    return ClientParts(model_name, hf_config, tokenizer, head, ClientContext(config, manager, p2p, loop), dht)
