"""Pure parts of audits: address groups, the audit schedule, auditor choice, one opinion per operator, rewinds."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import torch

from corolla.engine.client.hops import Hop
from corolla.engine.client.pending_audits import LAG_STEPS_WITHOUT_BOUND, PendingAudits, lag_bound
from corolla.engine.client.remote import HopStream
from corolla.engine.client.text import Rewind, TextStream
from corolla.engine.routing.groups import address_group, addrs_group
from corolla.engine.routing.trust import (
    Judgement,
    Opinion,
    Verdict,
    audit_due,
    choose_auditor,
    judge,
    settled,
    untried_auditors,
)


def test_address_groups_are_slash_24_and_slash_48() -> None:
    assert address_group("203.0.113.7") == address_group("203.0.113.200") == "203.0.113.0/24"
    assert address_group("203.0.114.7") != address_group("203.0.113.7")
    assert address_group("127.0.1.1") != address_group("127.0.2.1")  # the tests' operators on loopback
    assert address_group("2001:db8:1:2::5") == address_group("2001:db8:1:ffff::1") == "2001:db8:1::/48"
    assert address_group("::ffff:198.51.100.9") == "198.51.100.0/24"  # IPv4-mapped counts as IPv4
    assert address_group("Example.COM") == "example.com"  # a name is its own group


def test_group_of_observed_addresses_skips_relays() -> None:
    relayed = "/ip4/198.51.100.1/tcp/4001/p2p/QmRelay/p2p-circuit"
    assert addrs_group([relayed, "/ip4/203.0.113.9/tcp/31337"]) == "203.0.113.0/24"
    assert addrs_group(["/ip6/2001:db8::1/tcp/1"]) == "2001:db8::/48"
    assert addrs_group([relayed]) is None and addrs_group([]) is None


def test_audit_schedule() -> None:
    kw = {"first_steps": 2, "every": 16, "rate": 0.05}
    assert not audit_due(0, passed=0, draw=0.0, **kw)  # nothing unaudited
    assert audit_due(1, passed=1, draw=0.99, **kw)  # a new server: after each of its first steps
    assert not audit_due(15, passed=2, draw=0.99, **kw)
    assert audit_due(16, passed=2, draw=0.99, **kw)  # a lie never stands more than `every` steps
    assert audit_due(3, passed=2, draw=0.01, **kw)  # and at random in between
    assert not audit_due(100, passed=2, draw=0.99, first_steps=2, every=0, rate=0.05)


def test_auditor_is_never_of_the_checked_group_and_has_the_longest_record() -> None:
    groups = {"s": "A", "colluder": "A", "h1": "B", "h2": "C", "new": "D"}
    record = {"h1": 5, "h2": 5, "new": 0, "colluder": 99}
    rng = random.Random(0)
    picks = Counter(
        choose_auditor(["colluder", "h1", "h2", "new"], record=record, groups=groups, exclude_groups={"A"}, rng=rng)
        for _ in range(200)
    )
    assert set(picks) == {"h1", "h2"} and min(picks.values()) > 50  # ties at random, never the colluder
    assert choose_auditor(["colluder"], record=record, groups=groups, exclude_groups={"A"}, rng=rng) is None
    # A peer whose group is unknown is its own group: never mistaken for a known one.
    assert choose_auditor(["x"], record={}, groups={}, exclude_groups={"A"}, rng=rng) == "x"


def test_untried_auditors_are_few_one_per_group_and_random() -> None:
    # 30 silent identities of one /24 (known once connected), 20 never connected, two honest groups.
    groups = {f"s{i}": "A" for i in range(30)} | {"h1": "B", "h2": "C", "server": "D"}
    candidates = [f"s{i}" for i in range(30)] + [f"d{i}" for i in range(20)] + ["h1", "h2"]
    rng = random.Random(0)
    seen: Counter[str] = Counter()
    for _ in range(300):
        asked = untried_auditors(candidates, groups=groups, exclude_groups={"D", "C"}, rng=rng, limit=3)
        assert len(asked) == 3 and "h2" not in asked  # a group already heard is never asked
        assert sum(groups.get(p) == "A" for p in asked) <= 1  # one per known group
        seen.update(asked)
    assert seen["h1"] > 10 and len([p for p in seen if p.startswith("d")]) > 10  # at random, not by name
    assert untried_auditors(["s1", "s2"], groups=groups, exclude_groups={"A"}, rng=rng, limit=3) == []
    assert untried_auditors(candidates, groups=groups, exclude_groups=(), rng=rng, limit=0) == []


def test_one_operator_is_one_opinion() -> None:
    # The checked server and its colluder (same /24) agree; an honest operator disagrees: no proof either way.
    opinions = [Opinion(("s",), 0, "A"), Opinion(("colluder",), 0, "A"), Opinion(("h",), 1, "B")]
    assert not settled(opinions[:2])
    assert judge(opinions).verdict is Verdict.DISPUTED
    # Two more operators agree with each other against it: convicted.
    lied = judge([*opinions, Opinion(("h2",), 1, "C")])
    assert lied.verdict is Verdict.SERVER_LIED and lied.liars == ("s",)
    # Without operators (unknown origins) every route counts, as before.
    assert judge([Opinion(("s",), 0), Opinion(("a",), 0)]).verdict is Verdict.AGREE


def test_hop_claims_follow_rewinds_and_audits() -> None:
    hop = Hop(HopStream("peer", 0, 6))
    for t in range(5):
        hop.record(torch.full((1, 1, 2), float(t)), torch.full((1, 1, 2), 10.0 + t))
    claimed = hop.claimed()
    assert claimed is not None and claimed.shape == (1, 5, 2) and hop.steps == 5
    hop.mark_audited(3)  # audited up to 3 (claims are dropped, as after a passed audit)
    hop.record(torch.zeros(1, 1, 2), torch.ones(1, 1, 2))
    hop.rewind(2)  # before the audited position: nothing unaudited is left
    assert hop.claimed() is None and hop.audited == 2
    history = hop.history(2)
    assert history is not None and history[0, :, 0].tolist() == [0.0, 1.0]


def test_a_passed_audit_keeps_the_claims_recorded_while_it_ran() -> None:
    hop = Hop(HopStream("peer", 0, 6))
    for t in range(5):
        hop.record(torch.zeros(1, 1, 2), torch.full((1, 1, 2), float(t)))
    steps = hop.steps  # the audit covers positions 0..4 and began after 5 steps
    for t in range(5, 7):
        hop.record(torch.zeros(1, 1, 2), torch.full((1, 1, 2), float(t)))
    hop.passed_audit(5, steps)
    claimed = hop.claimed()
    assert claimed is not None and claimed[0, :, 0].tolist() == [5.0, 6.0]
    assert hop.audited == 5 and hop.steps == 2
    hop.passed_audit(4, 0)  # an audit that vouches for less than is audited changes nothing
    assert hop.audited == 5 and hop.steps == 2
    hop.passed_audit(7, 2)
    assert hop.claimed() is None and hop.audited == 7 and hop.steps == 0


def test_a_passed_audit_keeps_the_later_steps_signatures_in_step() -> None:
    hop = Hop(HopStream("peer", 0, 6))
    hop.record(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), b"prompt")
    hop.record(torch.zeros(1, 1, 2), torch.ones(1, 1, 2), b"one")
    hop.record(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0), b"two")  # positions 4..5
    hop.passed_audit(5, 2)  # an audit of positions 0..4 cuts the last step in two
    steps = hop.claimed_steps()
    assert [(first, claim.shape[1], c) for first, claim, c in steps] == [(5, 1, None)]  # a cut step: unsigned
    hop.record(torch.zeros(1, 1, 2), torch.full((1, 1, 2), 3.0), b"three")
    assert [(first, c) for first, _, c in hop.claimed_steps()] == [(5, None), (6, b"three")]
    hop.rewind(6)
    assert [(first, c) for first, _, c in hop.claimed_steps()] == [(5, None)]


def test_pending_audits_run_in_the_background_and_rewinds_narrow_them() -> None:
    async def scenario() -> None:
        audits = PendingAudits()
        hop, other = Hop(HopStream("a", 0, 3)), Hop(HopStream("b", 3, 6))
        release = asyncio.Event()

        async def judge_later(verdict: Verdict) -> Judgement:
            await release.wait()
            return Judgement(verdict)

        first = audits.start(hop, 8, judge_later(Verdict.AGREE))
        second = audits.start(hop, 10, judge_later(Verdict.SERVER_LIED))  # a fresh one next to it
        elsewhere = audits.start(other, 10, judge_later(Verdict.AGREE))
        await asyncio.sleep(0)
        assert audits.of(hop) is first and audits.all_of(hop) == [first, second] and not audits.finished()
        audits.rewind(6)  # outputs from 6 on were dropped: no audit vouches for them
        assert (first.end, second.end, elsewhere.end) == (6, 6, 6)
        asyncio.get_running_loop().call_later(0.05, release.set)
        assert (await audits.result(first)).verdict is Verdict.AGREE
        assert audits.waited >= 0.04 and audits.seconds >= 0.04
        assert audits.finished() == [second, elsewhere]  # judgements in, held until taken, oldest first
        audits.drop(hop)
        assert audits.in_order() == [elsewhere]
        release.clear()
        stuck = audits.start(hop, 12, judge_later(Verdict.AGREE))
        audits.cancel_all()
        await asyncio.sleep(0)
        assert len(audits) == 0 and stuck.task.cancelled()

    asyncio.run(scenario())


def test_an_audit_lags_at_most_the_schedules_bound() -> None:
    assert lag_bound(32) == 32 and lag_bound(0) == LAG_STEPS_WITHOUT_BOUND


def test_text_stream_withdraws_rewound_text() -> None:
    cuts: list[int] = []
    stream = TextStream(
        iter([1, 2, 3, Rewind(1), 4, 5]),
        lambda ids: "".join("abcdef"[i] for i in ids),
        prompt_tokens=2,
        on_rewind=cuts.append,
    )
    shown = ""
    told = 0
    for piece in stream:
        for cut in stream.rewinds[told:]:
            shown = shown[:cut]
        told = len(stream.rewinds)
        shown += piece
    result = stream.result()
    assert shown == result.text == "bef" and cuts == [1] and result.completion_tokens == 3


def test_an_audit_with_no_possible_auditor_asks_no_daemon() -> None:
    """A hop whose blocks no other server holds is unverified at once: no round trip to the p2p daemon (it ran
    after every first step of a session and at the end of every generation on a swarm without replicas)."""
    import asyncio

    from corolla.engine.client import spot_check
    from corolla.engine.client.context import ClientContext
    from corolla.engine.config import ClientConfig
    from corolla.engine.dht.records import ServerRecord, ServerState
    from corolla.engine.routing.sequence_manager import SequenceManager
    from corolla.engine.routing.spans import RemoteSpan

    class Daemon:
        asked = 0

        async def list_peers(self) -> list[object]:
            self.asked += 1
            return []

    manager = SequenceManager(None, "tiny", 4, ClientConfig())

    def span(peer: str, start: int, end: int) -> RemoteSpan:
        return RemoteSpan(peer, start, end, ServerRecord(state=ServerState.ONLINE, start=start, end=end))

    manager._spans = {"A": span("A", 0, 2), "B": span("B", 2, 4)}
    daemon = Daemon()
    context = ClientContext(ClientConfig(), manager, daemon, None)  # type: ignore[arg-type]
    x = torch.zeros(1, 3, 8)
    judgement = asyncio.run(spot_check.audit(context, "A", (0, 2), x, x[:, -1:], set(), random.Random(0))).judgement
    assert judgement.verdict is Verdict.UNVERIFIED
    assert daemon.asked == 0
    # A server of the same blocks (alone, or on a route of several) is a possible auditor; a banned one is not.
    manager._spans["C"] = span("C", 0, 4)
    assert spot_check._any_replica(manager, 0, 2, {"A"}, None, "none")
    assert not spot_check._any_replica(manager, 0, 2, {"A", "C"}, None, "none")
    manager._spans["D"], manager._spans["E"] = span("D", 0, 1), span("E", 1, 2)
    assert spot_check._any_replica(manager, 0, 2, {"A", "C"}, None, "none")
