"""Publishing a caught liar: the evidence of its lie, signed by this client, under the model's reports key.

After an audit convicts a one-server hop, the session hands the hop and the agreed output here.
:func:`evidence` picks the first unaudited step whose signed output disagrees with the agreed one and
builds a :class:`~corolla.engine.dht.report_records.PublishedReport`: the hop's inputs from position 0
through that step, the liar's outputs and signature, the honest outputs and the peers that computed them.
:func:`publish` stores it in the DHT from a background thread (a session never waits for the DHT). A step
the server did not sign (an older server) or evidence over the size bound stays in the local report file
only.

Every report this process publishes is signed by one key made for the process (:func:`reporter_identity`):
a report's signature says who reported, not that the reporter is honest; readers re-check the evidence
(:mod:`~corolla.engine.client.report_check`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import torch

from corolla.engine.client.context import ClientContext
from corolla.engine.client.hops import Hop
from corolla.engine.client.verify import outputs_agree
from corolla.engine.dht.announce import publish_report
from corolla.engine.dht.report_records import PublishedReport, ReportTooLarge
from corolla.engine.dht.signing import PeerIdentity
from corolla.engine.errors import short_peer

__all__ = ["evidence", "finish_publishing", "publish", "reporter_identity"]

logger = logging.getLogger(__name__)

_PUBLISHING: set[threading.Thread] = set()
"""Publications under way (a client that leaves waits for them: :func:`finish_publishing`)."""


@functools.cache
def reporter_identity() -> PeerIdentity:
    """The key that signs this process's reports (made on first use)."""
    return PeerIdentity.generate()


def evidence(
    model: str,
    hop: Hop,
    audited: tuple[int, int],
    truth: torch.Tensor,
    witnesses: tuple[str, ...],
    rel_tol: float,
    reporter: PeerIdentity,
) -> PublishedReport | None:
    """A report of the first signed step of ``hop`` whose claimed outputs disagree with ``truth``.

    Args:
        model: The model name.
        hop: The convicted hop, before it is rewound (its unaudited steps, their inputs and signatures).
        audited: The positions ``(begin, end)`` the audit recomputed (audits run in the background: the hop
            may have stepped on since, or passed an older audit).
        truth: The agreed outputs of those positions, [batch, end - begin, hidden].
        witnesses: The peers that computed ``truth``.
        rel_tol: The tolerance the audit compared with.
        reporter: The key that signs the report.

    Returns:
        None if no disagreeing step carries a signature (the lie cannot be shown to anyone else).
    """
    begin, end = audited
    for first, claim, commitment in hop.claimed_steps():
        last = first + claim.shape[1]
        if first < begin:
            continue  # (not covered by this audit)
        if last > end:
            break  # stepped after the audit began
        honest = truth[:, first - begin : last - begin]
        if outputs_agree(claim, honest, rel_tol):
            continue
        inputs = hop.history(last)
        if commitment is None or inputs is None:
            return None
        return PublishedReport(
            accused=hop.stream.peer_id,
            reporter=reporter.peer_id,
            model=model,
            start=hop.start,
            end=hop.end,
            inputs=inputs,
            claimed=claim,
            commitment=commitment,
            honest=honest.to(claim.dtype).contiguous(),
            witnesses=witnesses,
            time=time.time(),
        )
    return None


def publish(context: ClientContext, report: PublishedReport, reporter: PeerIdentity) -> threading.Thread:
    """Store ``report`` in the DHT from a daemon thread (failures are logged); returns the thread."""

    def run() -> None:
        try:
            stored = publish_report(context.manager.dht, reporter, report, timeout=context.config.request_timeout)
        except ReportTooLarge as e:
            logger.info("report on %s kept locally: %s", short_peer(report.accused), e)
            return
        except Exception as e:  # best effort: the local report file has it
            logger.info("could not publish the report on %s: %s", short_peer(report.accused), e)
            return
        logger.info("published the report on %s (%s)", short_peer(report.accused), "stored" if stored else "no peer")

    def tracked() -> None:
        try:
            run()
        finally:
            _PUBLISHING.discard(threading.current_thread())

    thread = threading.Thread(target=tracked, name="corolla-report", daemon=True)
    _PUBLISHING.add(thread)
    thread.start()
    return thread


def finish_publishing(timeout: float) -> None:
    """Wait up to ``timeout`` seconds in all for the publications under way (before the DHT shuts down)."""
    deadline = time.monotonic() + timeout
    for thread in list(_PUBLISHING):
        thread.join(max(0.0, deadline - time.monotonic()))
