"""Joining and leaving the swarm as a client: the DHT, its P2P replica on the client's loop, the routes.

Also the tokenizer a client loads next to its embeddings and head.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from corolla.engine.client.credentials import credentials_for
from corolla.engine.client.loop import LoopThread
from corolla.engine.config import ClientConfig
from corolla.engine.dht.announce import make_dht
from corolla.engine.models.checkpoint import Checkpoint
from corolla.engine.routing.sequence_manager import SequenceManager

logger = logging.getLogger(__name__)


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
