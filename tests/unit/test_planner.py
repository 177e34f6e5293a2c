"""Spans from DHT records and route planning (pure functions, no sockets)."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter

import pytest

from corolla.engine.dht.records import ServerRecord, ServerState
from corolla.engine.errors import MissingBlocksError, NoRouteError
from corolla.engine.routing.planner import (
    DEFAULT_RTT_S,
    HOP_OVERHEAD_S,
    RouteHop,
    block_seconds,
    plan_forward_route,
    plan_inference_route,
    relay_leg_seconds,
)
from corolla.engine.routing.spans import RemoteSpan, block_coverage, missing_blocks, spans_from_records


def record(
    start: int,
    end: int,
    *,
    rps: float = 10.0,
    throughput: float = 100.0,
    cache: int = 10_000,
    state: ServerState = ServerState.ONLINE,
) -> ServerRecord:
    return ServerRecord(
        state=state, start=start, end=end, throughput=throughput, inference_rps=rps, cache_tokens_left=cache
    )


def span(peer_id: str, start: int, end: int, **kwargs: float) -> RemoteSpan:
    return RemoteSpan(peer_id, start, end, record(start, end, **kwargs))  # type: ignore[arg-type]


def swarm(*items: RemoteSpan) -> dict[str, RemoteSpan]:
    return {s.peer_id: s for s in items}


def assert_covers(route: list[RouteHop], start: int, end: int) -> None:
    assert route, "empty route"
    assert route[0].start == start
    assert route[-1].end == end
    for hop in route:
        assert hop.start < hop.end
    for left, right in itertools.pairwise(route):
        assert left.end == right.start


def route_cost(route: list[RouteHop], spans: dict[str, RemoteSpan], rtt: dict[str, float]) -> float:
    return sum(
        rtt.get(h.peer_id, DEFAULT_RTT_S) + HOP_OVERHEAD_S + h.length * block_seconds(spans[h.peer_id]) for h in route
    )


def reference_cost(spans: dict[str, RemoteSpan], start: int, end: int, rtt: dict[str, float]) -> float:
    """Textbook Dijkstra over (boundary, peer or None) nodes, to check the planner's sweep against."""
    best: dict[tuple[int, str | None], float] = {(start, None): 0.0}
    queue: list[tuple[float, int, str]] = [(0.0, start, "")]
    while queue:
        cost, boundary, peer = heapq.heappop(queue)
        node = (boundary, peer or None)
        if cost > best.get(node, float("inf")):
            continue
        if boundary == end and not peer:
            return cost
        moves: list[tuple[float, int, str]] = []
        if peer:
            moves.append((cost, boundary, ""))  # leave the server
            s = spans[peer]
            if s.covers(boundary) and boundary < end:
                moves.append((cost + block_seconds(s), boundary + 1, peer))
        elif boundary < end:
            for s in spans.values():
                if s.covers(boundary):
                    enter = rtt.get(s.peer_id, DEFAULT_RTT_S) + HOP_OVERHEAD_S
                    moves.append((cost + enter + block_seconds(s), boundary + 1, s.peer_id))
        for new_cost, new_boundary, new_peer in moves:
            key = (new_boundary, new_peer or None)
            if new_cost < best.get(key, float("inf")):
                best[key] = new_cost
                heapq.heappush(queue, (new_cost, new_boundary, new_peer))
    raise AssertionError("no route")


# --- spans -------------------------------------------------------------------------------------


def test_spans_from_records_uses_each_servers_record() -> None:
    a, b = record(0, 3), record(2, 5, state=ServerState.JOINING)
    by_block = {0: {"a": a}, 1: {"a": a}, 2: {"a": a, "b": b}, 3: {"b": b}, 4: {"b": b}}
    spans = spans_from_records(by_block)
    assert spans == {"a": RemoteSpan("a", 0, 3, a)}
    both = spans_from_records(by_block, states=(ServerState.JOINING, ServerState.ONLINE))
    assert both["b"] == RemoteSpan("b", 2, 5, b)


def test_spans_from_records_tolerates_partial_and_inconsistent_reads() -> None:
    new, old = record(4, 8), record(0, 4)
    by_block = {
        0: {"moved": old},  # stale record from before the move
        4: {"moved": new},
        5: {"moved": new},  # blocks 6 and 7 were not read back: the record still says 4:8
        1: {"liar": record(2, 3)},  # filed under a block its own record does not claim
    }
    spans = spans_from_records(by_block)
    assert spans == {"moved": RemoteSpan("moved", 4, 8, new)}
    assert spans_from_records(by_block, num_blocks=6)["moved"].end == 6
    assert spans_from_records({9: {"x": record(9, 12)}}, num_blocks=8) == {}


def test_coverage_and_missing_blocks() -> None:
    spans = swarm(span("a", 0, 3), span("b", 2, 5), span("c", 7, 12))
    assert block_coverage(spans, 8) == [["a"], ["a"], ["a", "b"], ["b"], ["b"], [], [], ["c"]]
    assert missing_blocks(spans, 10) == [5, 6]
    assert missing_blocks({}, 3) == [0, 1, 2]


# --- inference routes ----------------------------------------------------------------------------


def test_route_prefers_faster_server() -> None:
    spans = swarm(span("slow", 0, 8, rps=5.0), span("fast", 0, 8, rps=50.0))
    assert plan_inference_route(spans, 0, 8) == [RouteHop("fast", 0, 8)]


def test_route_prefers_closer_server() -> None:
    spans = swarm(span("far", 0, 8), span("near", 0, 8))
    route = plan_inference_route(spans, 0, 8, rtt={"far": 0.5, "near": 0.01})
    assert route == [RouteHop("near", 0, 8)]
    # An unmeasured server is assumed to be at the default round-trip time.
    assert plan_inference_route(spans, 0, 8, rtt={"far": 0.5}) == [RouteHop("near", 0, 8)]


def test_route_avoids_extra_hops_but_uses_parts_of_spans() -> None:
    spans = swarm(span("a", 0, 6), span("b", 3, 10), span("c", 0, 3, rps=5.0), span("d", 6, 10, rps=5.0))
    route = plan_inference_route(spans, 0, 10)
    assert len(route) == 2
    assert_covers(route, 0, 10)
    assert route[0].peer_id == "a" and route[1].peer_id == "b"


def test_route_respects_bans() -> None:
    spans = swarm(span("a", 0, 8, rps=100.0), span("b", 0, 4), span("c", 4, 8))
    assert plan_inference_route(spans, 0, 8, banned={"a"}) == [RouteHop("b", 0, 4), RouteHop("c", 4, 8)]


def test_route_replans_only_a_sub_range() -> None:
    spans = swarm(span("a", 0, 10), span("b", 2, 10, rps=100.0))
    route = plan_inference_route(spans, 4, 7, banned={"a"})
    assert route == [RouteHop("b", 4, 7)]


def test_route_penalizes_servers_short_of_cache() -> None:
    spans = swarm(span("full", 0, 8, rps=100.0, cache=10), span("roomy", 0, 8, rps=10.0, cache=5_000))
    assert plan_inference_route(spans, 0, 8, cache_tokens_needed=1_000) == [RouteHop("roomy", 0, 8)]
    assert plan_inference_route(spans, 0, 8) == [RouteHop("full", 0, 8)]
    # A server short of cache is still used when nothing else hosts the blocks.
    only = swarm(spans["full"])
    assert plan_inference_route(only, 0, 8, cache_tokens_needed=1_000) == [RouteHop("full", 0, 8)]


def test_missing_blocks_error_names_the_blocks() -> None:
    spans = swarm(span("a", 0, 3), span("b", 5, 8), span("c", 3, 4))
    with pytest.raises(MissingBlocksError) as caught:
        plan_inference_route(spans, 0, 10, model="tiny-llama", banned={"c"})
    assert caught.value.blocks == [3, 4, 8, 9]
    assert caught.value.model == "tiny-llama"
    assert "3:5, 8:10" in str(caught.value)
    # Only blocks inside the requested range count.
    with pytest.raises(MissingBlocksError) as caught:
        plan_inference_route(spans, 6, 9)
    assert caught.value.blocks == [8]


def test_empty_range_is_rejected() -> None:
    with pytest.raises(ValueError):
        plan_inference_route(swarm(span("a", 0, 4)), 2, 2)


def test_route_matches_reference_dijkstra_on_random_swarms() -> None:
    rng = random.Random(7)
    for _ in range(40):
        total = rng.randint(3, 16)
        spans: dict[str, RemoteSpan] = {}
        for i in range(rng.randint(1, 12)):
            start = rng.randrange(total)
            end = rng.randint(start + 1, total)
            spans[f"p{i}"] = span(f"p{i}", start, end, rps=rng.uniform(1.0, 50.0))
        for block in missing_blocks(spans, total):
            spans[f"fill{block}"] = span(f"fill{block}", block, block + 1, rps=rng.uniform(1.0, 50.0))
        rtt = {peer: rng.uniform(0.0, 0.2) for peer in spans if rng.random() < 0.7}
        start = rng.randrange(total)
        end = rng.randint(start + 1, total)
        route = plan_inference_route(spans, start, end, rtt=rtt)
        assert_covers(route, start, end)
        for hop in route:
            assert spans[hop.peer_id].start <= hop.start and hop.end <= spans[hop.peer_id].end
        assert route_cost(route, spans, rtt) == pytest.approx(reference_cost(spans, start, end, rtt))


# --- forward routes ------------------------------------------------------------------------------


def test_forward_route_covers_exactly_and_respects_bans() -> None:
    spans = swarm(span("a", 0, 5), span("b", 3, 10), span("c", 0, 10), span("d", 5, 10))
    rng = random.Random(0)
    for _ in range(50):
        route = plan_forward_route(spans, 2, 9, rng=rng, banned={"c"})
        assert_covers(route, 2, 9)
        assert "c" not in {hop.peer_id for hop in route}
    with pytest.raises(MissingBlocksError):
        plan_forward_route(spans, 0, 10, rng=rng, banned={"a", "c"})


def test_forward_route_spreads_load_by_throughput() -> None:
    spans = swarm(span("big", 0, 4, throughput=300.0), span("small", 0, 4, throughput=100.0))
    rng = random.Random(1)
    picks = Counter(plan_forward_route(spans, 0, 4, rng=rng)[0].peer_id for _ in range(2_000))
    assert 0.70 < picks["big"] / 2_000 < 0.80


def test_forward_route_is_reproducible_with_a_seed() -> None:
    spans = swarm(*(span(f"p{i}", i, i + 4, throughput=10.0 * (i + 1)) for i in range(8)))
    spans.update(swarm(span("head", 0, 4)))
    first = plan_forward_route(spans, 0, 11, rng=random.Random(3))
    assert first == plan_forward_route(spans, 0, 11, rng=random.Random(3))


def test_no_route_error_when_only_banned_servers_host_blocks() -> None:
    spans = swarm(span("a", 0, 4), span("b", 4, 8), span("c", 4, 6), span("d", 0, 2))
    with pytest.raises(NoRouteError) as caught:
        plan_inference_route(spans, 0, 8, model="tiny-llama", banned={"b", "c", "d"})
    assert caught.value.blocks == [4, 5, 6, 7]
    assert caught.value.avoided == ("b", "c")  # the servers of the uncovered blocks, not every banned one
    with pytest.raises(NoRouteError):
        plan_forward_route(spans, 4, 8, rng=random.Random(0), banned={"b"})
    # A block nobody announces is missing, not merely unroutable.
    with pytest.raises(MissingBlocksError) as missing:
        plan_inference_route(swarm(span("a", 0, 4), span("b", 5, 8)), 0, 8, banned={"b"})
    assert not isinstance(missing.value, NoRouteError)
    assert missing.value.blocks == [4, 5, 6, 7]


def test_a_relayed_server_costs_one_more_leg_until_measured() -> None:
    relayed = RemoteSpan("relayed", 0, 8, record(0, 8).model_copy(update={"relayed": True, "relay": "R"}))
    spans = swarm(relayed, span("direct", 0, 8, rps=9.8))  # the direct one is a little slower per block
    assert relay_leg_seconds(relayed, {}, DEFAULT_RTT_S) == DEFAULT_RTT_S
    assert plan_inference_route(spans, 0, 8) == [RouteHop("direct", 0, 8)]  # the relay's leg outweighs it
    # A measured round trip already went through the relay: then only the measurement counts.
    assert relay_leg_seconds(relayed, {"relayed": 0.01}, DEFAULT_RTT_S) == 0.0
    assert plan_inference_route(spans, 0, 8, rtt={"relayed": 0.01, "direct": 0.01}) == [RouteHop("relayed", 0, 8)]
