"""``corolla demo``: a whole swarm on this machine (a DHT peer and server processes sharing
SmolLM2-135M-Instruct's blocks), a client that streams answers through it, and a clean exit.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from corolla.engine.errors import CorollaError, install_hint

if TYPE_CHECKING:
    from corolla.engine.client.model import DistributedModelForCausalLM
    from corolla.engine.client.session import InferenceSession

logger = logging.getLogger(__name__)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_demo(prompt: str | None, max_new_tokens: int = 64, num_servers: int = 2, serve: bool = False) -> int:
    """Start the local swarm, answer ``prompt`` (or chat interactively), stop everything. Returns an exit code."""
    import torch
    from transformers import AutoConfig

    from corolla.engine.apps.local_swarm import Swarm, smollm2_checkpoint, split_blocks
    from corolla.engine.client.model import DistributedModelForCausalLM

    # SIGTERM unwinds like Ctrl-C, so every process the demo started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    threads = max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    try:
        path = smollm2_checkpoint()
    except CorollaError as e:
        logger.error("%s", e)
        return 1
    spans = split_blocks(int(AutoConfig.from_pretrained(path).num_hidden_layers), num_servers)
    logger.info("starting a local swarm: %d servers hosting blocks %s", len(spans), ", ".join(spans))
    with Swarm(path, spans=spans, threads=threads) as swarm:
        logger.info("swarm ready at %s", swarm.initial_peers[0])
        if serve:
            return _serve_forever(str(path), swarm.initial_peers)
        with DistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, num_threads=threads
        ) as model:
            if prompt is not None:
                _answer(model, [{"role": "user", "content": prompt}], max_new_tokens)
                return 0
            return _chat_loop(model, max_new_tokens)


def _serve_forever(path: str, initial_peers: list[str]) -> int:
    import time

    _write(
        "The demo swarm is up. In another shell:\n"
        f"  export COROLLA_MODEL={path}\n"
        f"  export COROLLA_INITIAL_PEERS={' '.join(initial_peers)}\n"
        f"  {install_hint('examples')}   # once: what the examples need\n"
        "  python examples/langchain_chain.py   # or examples/llama_index_query.py\n"
        "Ctrl-C stops every process of the swarm.\n"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


def _answer(
    model: DistributedModelForCausalLM,
    messages: list[dict[str, str]],
    max_new_tokens: int,
    session: InferenceSession | None = None,
) -> str:
    stream = model.stream_chat(messages, max_new_tokens=max_new_tokens, session=session)
    for piece in stream:
        _write(piece)
    _write(cut_note(stream.finish_reason, max_new_tokens, dim=sys.stdout.isatty()))
    return stream.text


def cut_note(finish_reason: str | None, max_new_tokens: int, dim: bool = False) -> str:
    """What ends a printed answer: a newline, or for one cut at the token limit "…" and a note on its own line."""
    if finish_reason != "length":
        return "\n"
    note = f"[cut at {max_new_tokens} tokens: --max-new-tokens]"
    return f"…\n\x1b[2m{note}\x1b[0m\n" if dim else f"…\n{note}\n"


def _chat_loop(model: DistributedModelForCausalLM, max_new_tokens: int) -> int:
    _write("Chat with SmolLM2-135M-Instruct through the local swarm. Empty line or Ctrl-D to quit.\n")
    messages: list[dict[str, str]] = []
    with model.inference_session(max_length=2048) as session:
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                _write("\n")
                return 0
            if not line:
                return 0
            messages.append({"role": "user", "content": line})
            _write("model> ")
            reply = _answer(model, messages, max_new_tokens, session)
            messages.append({"role": "assistant", "content": reply})
