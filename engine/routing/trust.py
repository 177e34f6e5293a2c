"""What a client believes about servers: claims capped by measurements, spot-check schedule, verdicts.

Pure functions over plain data, shared by the client (the sequence manager and inference sessions) and
the swarm simulator (``benchmarks/swarm_simulation.py``), so both route, verify and ban the same way.

* :func:`believed_block_seconds`: a server's announced speed is a claim; the planner uses the slower of
  the claim and what this client measured, and never a speed faster than :data:`FASTEST_BLOCK_S`.
* :func:`probe_problem`: a new server answers ``info`` before it carries a session; its protocol
  version, model and span must match what its record said.
* :func:`should_verify`: which steps get their output recomputed on an independent replica.
* :func:`audit_due`: when a hop's run of unaudited steps is recomputed (in one stateless forward).
* :func:`choose_auditor`: which replica recomputes it: never one of the checked server's address group,
  at random among those with the longest honest record (never "the fastest announced"), and only among
  replicas that passed their probe; :func:`untried_auditors`: the few unprobed ones asked at once when no
  probed replica qualifies.
* :func:`judge`: who lied, from the outputs of independent replicas (two address groups that agree settle it).
* :func:`silent_bound`: how long to wait for a step before a server counts as silent.
* :func:`on_this_machine`, :func:`warn_unverified`: whether a hop nobody could check is worth a warning.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = [
    "FASTEST_BLOCK_S",
    "MAX_OPINIONS",
    "Judgement",
    "Opinion",
    "Verdict",
    "audit_due",
    "ban_seconds",
    "believed_block_seconds",
    "choose_auditor",
    "judge",
    "on_this_machine",
    "probe_problem",
    "settled",
    "should_verify",
    "silent_bound",
    "untried_auditors",
    "warn_unverified",
]

FASTEST_BLOCK_S = 1e-4
"""Seconds per token per block below which an announced speed is implausible (10,000 block-steps/s)."""
MAX_OPINIONS = 4
"""Outputs gathered at most for one spot check (the server's own and three replicas')."""
SILENT_RTT_FACTOR = 5.0
"""A step may take this many times the server's measured round trip (plus its compute) before it is silent."""
SILENT_COMPUTE_FACTOR = 10.0
"""A step may take this many times its expected compute (tokens x blocks x believed seconds) on top."""


def believed_block_seconds(announced_s: float, measured_s: float | None) -> float:
    """Seconds per token per block the planner should assume for a server.

    Args:
        announced_s: What the server's record implies (1 / announced speed).
        measured_s: What this client measured on its own steps through the server, if any.

    Returns:
        The slower of claim and measurement, never faster than :data:`FASTEST_BLOCK_S`: a record that
        announces a speed of 1e9 is believed no more than a plausible one, and a measured slow server
        is not taken at its word.
    """
    claim = announced_s if math.isfinite(announced_s) and announced_s > 0 else FASTEST_BLOCK_S
    believed = max(claim, FASTEST_BLOCK_S)
    if measured_s is not None and math.isfinite(measured_s) and measured_s > 0:
        believed = max(believed, measured_s)
    return believed


def probe_problem(info: Mapping[str, Any], *, version: int, model: str, start: int, end: int) -> str | None:
    """Why a server's ``info`` answer disqualifies it for blocks ``[start, end)``, or None if it fits.

    Args:
        info: The decoded info record the server sent (untrusted).
        version: The protocol version this client speaks.
        model: The model name the client routes for (the DHT prefix).
        start: First block the client wants from the server.
        end: One past the last block.
    """
    got = info.get("version")
    if got != version:
        return f"speaks protocol {got!r}, this client speaks {version}"
    if info.get("model") != model:
        return f"serves model {info.get('model')!r}, not {model!r}"
    s, e = info.get("start"), info.get("end")
    if not (isinstance(s, int) and isinstance(e, int) and s <= start and end <= e):
        return f"serves blocks {s!r}:{e!r}, its record promised {start}:{end}"
    return None


def ban_seconds(strikes: int, min_backoff: float, max_backoff: float) -> float:
    """Seconds to avoid a server after its ``strikes``-th failure in a row: doubling from ``min_backoff``, capped."""
    return min(max_backoff, min_backoff * 2 ** min(max(strikes - 1, 0), 62))


def should_verify(checked_steps: int, *, first_steps: int, rate: float, draw: float) -> bool:
    """Whether to recompute this step's output of a server on an independent replica.

    Args:
        checked_steps: Steps of this server this client has already verified.
        first_steps: A new server's first this-many steps are always verified.
        rate: Share of later steps verified (0 never, 1 always).
        draw: A uniform random number in ``[0, 1)`` (the caller's generator, for reproducibility).
    """
    return checked_steps < first_steps or draw < rate


def audit_due(unaudited: int, *, passed: int, first_steps: int, every: int, rate: float, draw: float) -> bool:
    """Whether to audit a hop now: recompute its whole run of ``unaudited`` steps on an independent replica.

    An audit checks every unaudited step at once, so a liar is caught at the first audit after its first lie
    however rarely it lies; the schedule only bounds how long a lie can stand.

    Args:
        unaudited: Steps of the hop's server since its last audit (0: nothing to audit).
        passed: Audits the server passed with this client (a new server is audited after each of its first steps).
        first_steps: Audits a new server gets after every step before the rest of the schedule applies.
        every: Audit at the latest after this many unaudited steps (0: no such bound).
        rate: Chance of an audit after any other step (0 never, 1 always).
        draw: A uniform random number in ``[0, 1)`` (the caller's generator, for reproducibility).
    """
    if unaudited <= 0:
        return False
    return passed < first_steps or (every > 0 and unaudited >= every) or draw < rate


def choose_auditor(
    candidates: Collection[str],
    *,
    record: Mapping[str, int],
    groups: Mapping[str, str],
    exclude_groups: Collection[str],
    rng: random.Random,
) -> str | None:
    """The replica to recompute a hop: outside ``exclude_groups``, longest honest record, ties at random.

    Args:
        candidates: Peers serving the hop's blocks with the same weights (the checked server excluded).
        record: Audits each peer passed with this client (missing: 0).
        groups: Each peer's address group, from the addresses this client's connections to it came from
            (missing: the peer is its own group, so an unseen peer is never mistaken for a known one).
        exclude_groups: Groups whose opinion is already counted (the checked server's, earlier auditors').
        rng: The caller's generator: an attacker cannot predict which replica checks it.
    """
    eligible = sorted(p for p in candidates if groups.get(p, p) not in exclude_groups)
    if not eligible:
        return None
    best = max(record.get(p, 0) for p in eligible)
    return rng.choice([p for p in eligible if record.get(p, 0) == best])


def untried_auditors(
    candidates: Collection[str],
    *,
    groups: Mapping[str, str],
    exclude_groups: Collection[str],
    rng: random.Random,
    limit: int,
) -> list[str]:
    """Replicas never probed to ask at once when no probed one qualifies: at most ``limit``, outside
    ``exclude_groups``, at most one of any known address group (one operator is one opinion), at random.

    Many cheap identities of one address cost one parallel round, not one silence each; an attacker cannot
    choose which of them is asked. A peer whose group is unknown (never connected) is its own group.

    Args:
        candidates: Unprobed peers serving the hop's blocks with the same weights.
        groups: Each peer's address group, as in :func:`choose_auditor`.
        exclude_groups: Groups whose opinion is already counted.
        rng: The caller's generator.
        limit: Peers asked at most (0: none).
    """
    shuffled = sorted(p for p in candidates if groups.get(p, p) not in exclude_groups)
    rng.shuffle(shuffled)
    taken: set[str] = set()
    out: list[str] = []
    for peer in shuffled:
        group = groups.get(peer, peer)
        if group not in taken and len(out) < limit:
            taken.add(group)
            out.append(peer)
    return out


class Verdict(Enum):
    """Outcome of a spot check."""

    AGREE = "agree"  # an independent replica recomputed the same output: the server told the truth
    SERVER_LIED = "server_lied"  # two independent replicas agree with each other, against the server
    DISPUTED = "disputed"  # no output is backed by two independent sources: the server becomes a suspect
    UNVERIFIED = "unverified"  # no independent replica exists for the hop's blocks


@dataclass(frozen=True)
class Opinion:
    """One output of a hop: the peers of the route that computed it, and which outputs it matched.

    ``group`` numbers the distinct outputs seen: opinions with the same group matched each other.
    ``operator`` is the route's address group(s): a later opinion of an operator already heard is ignored
    (colluders in one /24 are one opinion). Empty: the peers themselves are the operator.
    """

    peers: tuple[str, ...]
    group: int
    operator: str = ""


def _independent(opinions: list[Opinion]) -> list[Opinion]:
    """The first opinion of each operator, in order."""
    seen: set[str] = set()
    kept = []
    for o in opinions:
        who = o.operator or "+".join(o.peers)
        if who not in seen:
            seen.add(who)
            kept.append(o)
    return kept


@dataclass(frozen=True)
class Judgement:
    """A verdict, the peers it convicts (ban for the session and report) and those merely suspected.

    A one-peer route whose output disagrees with the majority convicts that peer. A multi-peer route
    that disagrees holds at least one liar, but which one is unknown: its peers are suspects (avoided
    for the session, not reported).
    """

    verdict: Verdict
    liars: tuple[str, ...] = ()
    suspects: tuple[str, ...] = ()


def settled(opinions: list[Opinion]) -> bool:
    """Whether some output is backed by two independent operators (stop asking more replicas)."""
    groups = [o.group for o in _independent(opinions)]
    return any(groups.count(g) >= 2 for g in set(groups))


def judge(opinions: list[Opinion]) -> Judgement:
    """Decide a spot check from the opinions gathered; ``opinions[0]`` is the checked server's own output.

    Every later opinion came from a route that avoids the peers of all earlier ones, so two matching
    opinions are two independent sources, unless one operator (address group) gave both: only an operator's
    first opinion counts. The output backed by two operators is the truth.
    """
    opinions = _independent(opinions)
    if len(opinions) < 2:
        return Judgement(Verdict.UNVERIFIED)
    groups = [o.group for o in opinions]
    backed = [g for g in dict.fromkeys(groups) if groups.count(g) >= 2]
    if not backed:  # nobody's output is backed, the server's included: leave it (not reported: unproven)
        return Judgement(Verdict.DISPUTED, suspects=opinions[0].peers)
    truth = backed[0]
    liars = tuple(o.peers[0] for o in opinions if o.group != truth and len(o.peers) == 1)
    suspects = tuple(p for o in opinions if o.group != truth and len(o.peers) > 1 for p in o.peers)
    verdict = Verdict.AGREE if opinions[0].group == truth else Verdict.SERVER_LIED
    return Judgement(verdict, liars, suspects)


def silent_bound(
    rtt_s: float | None, tokens: int, blocks: int, block_s: float, *, floor_s: float, ceiling_s: float
) -> float:
    """Seconds to wait for a step's answer before the server counts as silent.

    Tied to what the client measured: ``max(floor, 5 x RTT) + 10 x tokens x blocks x believed seconds
    per block``, at most ``ceiling_s``. A server whose RTT was never measured gets the floor for it.
    """
    rtt = rtt_s if rtt_s is not None and math.isfinite(rtt_s) and rtt_s >= 0 else 0.0
    compute = SILENT_COMPUTE_FACTOR * tokens * blocks * block_s
    return min(ceiling_s, max(floor_s, SILENT_RTT_FACTOR * rtt) + compute)


_LOOPBACK = ("/ip4/127.", "/ip6/::1/", "/dns/localhost/", "/dns4/localhost/", "/dns6/localhost/")


def on_this_machine(addrs: Sequence[str]) -> bool:
    """Whether a peer runs on this machine, from the addresses this client's connections to it were observed on.

    Observed connection addresses (not what the peer announces about itself) are all loopback, and none goes
    through a relay (``/p2p-circuit``: the relay, not the peer, is what is local). No address: unknown, False.
    """
    return bool(addrs) and all(a.startswith(_LOOPBACK) and "/p2p-circuit" not in a for a in addrs)


def warn_unverified(span: tuple[str, int, int], *, own_servers: bool, warned: Collection[tuple[str, int, int]]) -> bool:
    """Whether to warn that a hop's output could not be checked on an independent replica.

    Args:
        span: ``(model, start, end)`` of the hop.
        own_servers: The servers are the user's own (a private swarm, or a server on this machine, as in
            ``corolla demo``): there is nobody to distrust, so no warning.
        warned: Spans already warned about in this process: a user of a public swarm needs to know once
            that a span rests on one stranger's server, not at every session and hop.
    """
    return not own_servers and span not in warned
