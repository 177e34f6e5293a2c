"""Quantized and memory-capped servers in a real swarm: they serve within tolerance, say what they are in
their records, exact-only clients avoid them, and a --max-memory server takes the blocks that fit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from swarm_helpers import client, hf_model, max_diff, peer_id, random_ids, running_swarm
from transformers import PreTrainedModel

from corolla.engine.apps.health import format_table, swarm_health
from corolla.engine.apps.local_swarm import ServerProcess, Swarm
from corolla.engine.apps.monitor.state import model_state
from corolla.engine.config import ServerConfig
from corolla.engine.dht.announce import read_records
from corolla.engine.errors import MissingBlocksError
from corolla.engine.server.memory import block_weight_bytes, estimate_activation_bytes

pytestmark = pytest.mark.swarm

NF4_LOGIT_TOLERANCE = 0.35  # max |swarm - float32| / max |float32| logits, as in tests/unit/test_quant.py
# The memory-capped server: small limits so its activations are small; a budget of exactly two int8 blocks.
CAPPED = ServerConfig(
    quant="int8", cache_bytes=64 * 1024, max_length=128, max_chunk_tokens=128, max_tokens_in_flight=512
)
CAPPED_ARGS = ["--quant", "int8", "--cache-bytes", "65536", "--max-length", "128", "--max-chunk-tokens", "128"]
CAPPED_ARGS += ["--max-tokens-in-flight", "512", "--max-tokens-in-flight-per-peer", "512"]


@dataclass
class QuantSwarm:
    swarm: Swarm
    nf4: ServerProcess  # blocks 0:6, nf4
    bf16: ServerProcess  # blocks 3:6, bfloat16, unquantized
    capped: ServerProcess  # --max-memory for two int8 blocks, blocks of its own choice
    capped_limit: int
    path: Path
    hf: PreTrainedModel


@pytest.fixture(scope="module")
def quant_swarm(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuantSwarm]:
    path = tiny_checkpoint("llama")
    hf = hf_model(path)
    config = hf.config
    block = max(block_weight_bytes(config, torch.float32, "int8"))
    limit = 2 * block + estimate_activation_bytes(config, CAPPED, torch.float32, "int8") + CAPPED.cache_bytes
    with running_swarm(path, [], tmp_path_factory) as swarm:
        nf4 = swarm.add_server("0:6", wait=False, extra_args=["--quant", "nf4"])
        bf16 = swarm.add_server("3:6", wait=False, extra_args=["--dtype", "bfloat16"])
        capped = swarm.add_server(None, wait=False, extra_args=[*CAPPED_ARGS, "--max-memory", str(limit)])
        swarm.wait_ready()
        yield QuantSwarm(swarm, nf4, bf16, capped, limit, path, hf)


@pytest.mark.timeout(120)
@torch.inference_mode()
def test_quantized_servers_serve_within_tolerance_of_float32(quant_swarm: QuantSwarm) -> None:
    ids = random_ids(2, 10, seed=1)
    expected = quant_swarm.hf(ids).logits
    with client(quant_swarm.path, quant_swarm.swarm) as model:
        logits = model(ids).logits
        with model.inference_session(max_length=12) as session:
            stepped = model.head.logits(session.step(model.head.embed(ids)))
            route = {h.stream.peer_id for h in session.hops}
    error = max_diff(logits, expected) / float(expected.abs().max())
    assert 0 < error <= NF4_LOGIT_TOLERANCE  # blocks 0:3 have only quantized servers: never exact
    assert max_diff(stepped, expected) / float(expected.abs().max()) <= NF4_LOGIT_TOLERANCE
    assert route <= {peer_id(quant_swarm.nf4), peer_id(quant_swarm.bf16), peer_id(quant_swarm.capped)}


@pytest.mark.timeout(60)
def test_records_name_quantization_and_dtype(quant_swarm: QuantSwarm) -> None:
    records = read_records(quant_swarm.swarm.dht, quant_swarm.swarm.dht_prefix, range(6))
    seen = {peer: (r.quant, r.dtype) for by_peer in records.values() for peer, r in by_peer.items()}
    assert seen[peer_id(quant_swarm.nf4)] == ("nf4", "float32")
    assert seen[peer_id(quant_swarm.bf16)] == ("none", "bfloat16")
    assert seen[peer_id(quant_swarm.capped)] == ("int8", "float32")
    # `corolla health` and the monitor page say it too, so a user sees which servers are not exact.
    (health,) = swarm_health(quant_swarm.swarm.dht, quant_swarm.swarm.dht_prefix, 6)
    table = format_table([health])
    for server, label in (
        (quant_swarm.nf4, "float32+nf4"),
        (quant_swarm.bf16, "bfloat16"),
        (quant_swarm.capped, "float32+int8"),
    ):
        (line,) = [row for row in table.splitlines() if peer_id(server)[-8:] in row and "…" in row]
        assert f" {label} " in line
    rows = {row["peer_id"]: row for row in model_state("m", 6, records)["servers"]}
    assert rows[peer_id(quant_swarm.nf4)]["weights"] == "float32+nf4"
    assert rows[peer_id(quant_swarm.bf16)]["quant"] == "none"


@pytest.mark.timeout(120)
@torch.inference_mode()
def test_exact_only_clients_avoid_quantized_servers(quant_swarm: QuantSwarm) -> None:
    exact = peer_id(quant_swarm.bf16)
    with client(quant_swarm.path, quant_swarm.swarm, require_exact=True) as model:
        route = model.manager.plan_inference(3, 6)
        assert {hop.peer_id for hop in route} == {exact}
        with pytest.raises(MissingBlocksError) as info:  # only quantized servers host blocks 0:3
            model(random_ids(1, 4, seed=2))
        assert set(info.value.blocks) >= {0, 1, 2}


@pytest.mark.timeout(60)
def test_memory_capped_server_takes_the_blocks_that_fit(quant_swarm: QuantSwarm) -> None:
    status = quant_swarm.capped.status()
    start, end = (int(x) for x in status["blocks"].split(":"))
    assert end - start == 2  # the budget holds exactly two int8 blocks next to the cache floor and activations
    memory = status["memory"]
    assert memory["num_blocks"] == 2 and memory["limit"] == quant_swarm.capped_limit
    assert memory["weights_loaded"] == memory["weight_bytes"]  # what it holds is what it planned
    assert memory["weight_bytes"] + memory["cache_bytes"] + memory["activation_bytes"] == quant_swarm.capped_limit
    assert memory["cache_bytes"] == CAPPED.cache_bytes  # exactly two fit: nothing left over for the cache
