"""Helpers of the loopback swarm tests: swarms under pytest's temp folder, HF references, process checks.

Every swarm started here writes its logs and status files under pytest's base temp folder, and the
process group of every server is remembered, so the module-end check in conftest.py can tell the
server processes these tests started from any others on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import ServerProcess, Swarm
from corolla.engine.apps.tiny_models import FAMILY_TEST_OVERRIDES

ATOL = 1e-4
FAMILY_OVERRIDES = FAMILY_TEST_OVERRIDES  # every family, with the settings its logit tests use

STARTED_GROUPS: set[int] = set()  # process groups of every server these tests started


@contextlib.contextmanager
def running_swarm(
    path: Path, spans: Sequence[str | None], tmp_path_factory: pytest.TempPathFactory, **kwargs: Any
) -> Iterator[Swarm]:
    """A started loopback swarm whose logs live under pytest's temp folder; stopped on exit."""
    swarm = Swarm(path, spans, log_dir=tmp_path_factory.mktemp("swarm"), **kwargs)
    try:
        swarm.start()
        track(*swarm.servers)
        yield swarm
    finally:
        track(*swarm.servers)
        for server in swarm.servers:  # all leave the DHT at once; stop() then waits for each
            if server.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, signal.SIGTERM)
        swarm.stop()


def track(*servers: ServerProcess) -> None:
    """Remember servers (by process group: the server's, and its DHT process's) for the leftover-process check."""
    for server in servers:
        STARTED_GROUPS.add(server.pid)
        for proc in descendants(server.pid):
            with contextlib.suppress(OSError):
                STARTED_GROUPS.add(os.getpgid(proc.pid))


def descendants(pid: int) -> list[psutil.Process]:
    """Every process ``pid`` started, and theirs (empty if it is gone)."""
    with contextlib.suppress(psutil.Error):
        return list(psutil.Process(pid).children(recursive=True))
    return []


def still_running(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that still run (zombies waiting to be reaped count as gone)."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll until every one of ``procs`` has exited or ``timeout`` seconds passed; return those left."""
    deadline = time.monotonic() + timeout
    while (left := still_running(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def client(path: Path, swarm: Swarm, **overrides: Any) -> DistributedModelForCausalLM:
    """A client of ``swarm`` with short timeouts (a hung server fails the test quickly)."""
    overrides.setdefault("step_timeout", 20.0)
    overrides.setdefault("connect_timeout", 10.0)
    return DistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers, **overrides)


def hf_model(path: Path) -> PreTrainedModel:
    """The local transformers model of a checkpoint, float32, eval mode."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(model: PreTrainedModel, ids: torch.Tensor, max_new_tokens: int, eos: bool = True) -> torch.Tensor:
    """transformers' ``generate(do_sample=False)``; with ``eos=False`` it always runs the full length."""
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    config.pad_token_id = model.config.pad_token_id
    if not eos:
        config.eos_token_id = []  # not None: generate() fills None back in from the model's generation config
    out: torch.Tensor = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two tensors of the same shape."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def peer_id(server: ServerProcess) -> str:
    """A running server's peer id, from the multiaddrs in its status file."""
    maddrs: list[str] = server.status()["maddrs"]
    return maddrs[0].rsplit("/p2p/", 1)[1]


def random_ids(batch: int, length: int, seed: int, vocab: int = 160) -> torch.Tensor:
    """Token ids of ordinary characters (no special tokens), reproducible."""
    return torch.randint(7, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def group_processes(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of one process group."""
    found = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                found.append(proc)
    return found


def leftover_processes(base: Path) -> list[psutil.Process]:
    """Live processes of the servers these tests started: their groups, or command lines naming ``base``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error, OSError):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or ())
            ours = "corolla.engine.apps.cli" in cmdline and str(base) in cmdline
            if ours or os.getpgid(proc.pid) in STARTED_GROUPS:
                found.append(proc)
    return found


async def forward_answer(p2p: Any, peer: str, parts: Sequence[Any]) -> Any:
    """Send ``parts`` (ExpertRequests) on a stateless-forward stream to ``peer`` and keep the stream open:
    return the server's first answer (a StepResult), which must come before the client ends its stream."""
    from hivemind.p2p import PeerID
    from hivemind.proto import runtime_pb2

    from corolla.engine.wire.messages import RPC_FORWARD, StepResult

    done = asyncio.Event()

    async def requests() -> Any:
        for part in parts:
            yield part
        await done.wait()

    responses = await p2p.iterate_protobuf_handler(
        PeerID.from_base58(peer), RPC_FORWARD, requests(), runtime_pb2.ExpertResponse
    )
    try:
        async for response in responses:
            return StepResult.decode(response.metadata)
        raise AssertionError("the server ended the stream without an answer")
    finally:
        done.set()
        await responses.aclose()
