"""A fresh client's first read of the swarm (only the blocks a route needs) and probes under way, offline:
the DHT read is replaced by a table of records."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from corolla.engine.config import ClientConfig
from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.routing import sequence_manager
from corolla.engine.routing.sequence_manager import SequenceManager


def swarm(monkeypatch: pytest.MonkeyPatch, spans: dict[str, tuple[int, int]]) -> list[list[int]]:
    """Serve ``spans`` ({peer: (start, end)}) to the sequence manager's DHT reads; the blocks of each read."""
    reads: list[list[int]] = []

    def read_records(dht: object, model: str, blocks: Sequence[int], timeout: float = 30.0) -> dict:
        reads.append(list(blocks))
        return {
            b: {
                p: ServerRecord(state=ServerState.ONLINE, start=s, end=e, throughput=1e6)
                for p, (s, e) in spans.items()
                if s <= b < e
            }
            for b in blocks
        }

    monkeypatch.setattr(sequence_manager, "read_records", read_records)
    return reads


def manager(blocks: int = 6) -> SequenceManager:
    return SequenceManager(None, "tiny", blocks, ClientConfig())


def test_whole_spans_cost_one_read_of_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    identities = {f"id{i}": (0, 6) for i in range(50)}
    reads = swarm(monkeypatch, {**identities, "honest": (0, 6), "half": (3, 6)})
    m = manager()
    route = m.plan_inference()
    assert reads == [[0]]  # 51 records, not 51 x 6 + 3
    assert len(route) == 1 and "half" not in m.spans and len(m.spans) == 51


def test_first_read_follows_the_spans_to_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = swarm(monkeypatch, {"a": (0, 2), "b": (0, 3), "c": (3, 5), "d": (4, 6)})
    m = manager()
    m.first_read()
    assert reads == [[0], [3], [5]]
    assert set(m.spans) == {"a", "b", "c", "d"}
    route = m.plan_inference()
    assert route[0].start == 0 and route[-1].end == 6
    assert all(x.end == y.start for x, y in itertools.pairwise(route))
    assert reads == [[0], [3], [5]]  # still fresh: no second read


def test_a_gap_stops_the_first_read_and_the_plan_reads_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = swarm(monkeypatch, {"a": (0, 2), "late": (3, 6)})
    m = manager()
    with pytest.raises(sequence_manager.MissingBlocksError, match="2"):
        m.plan_inference()
    assert reads == [[0], [2], list(range(6))]  # nobody serves block 2: the full read says so


def test_a_server_being_probed_is_no_candidate_for_another_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    swarm(monkeypatch, {"a": (0, 6), "b": (0, 6)})
    m = manager()
    m.first_read()
    m.begin_probe("a")
    m.begin_probe("a")
    m.end_probe("a")
    assert m.probing() == {"a"} and [p for p, _, _ in m.unprobed(0, 6, (), 10)] == ["b"]
    m.end_probe("a")
    m.end_probe("a")  # an extra end is harmless
    assert m.probing() == set() and {p for p, _, _ in m.unprobed(0, 6, (), 10)} == {"a", "b"}
