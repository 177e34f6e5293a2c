"""Re-checking the swarm's liar reports before avoiding anyone they accuse.

A :class:`ReportChecker` thread reads the model's reports every ``report_refresh`` seconds. A report names
a server, the inputs of its session, the output it claimed and its signature of that output. For each new
report about a server this client could route through (it announces the report's blocks):

1. The accused's signature must verify over the claimed output and the inputs
   (:func:`~corolla.engine.wire.commitment.verify_commitment`, with the key its peer id stands for). If it
   does not, the report is forged: it is dropped, and its reporter is ignored from then on.
2. The step is recomputed, as one stateless forward of the report's inputs, on a replica of an address group
   other than the accused's (and, when there is one, other than the groups of the reporter's witnesses).
   If the claimed output matches the recomputed one, the report smears an honest server: dropped, and its
   reporter ignored. If the recomputed output matches the reporter's honest output instead, the accused is
   convicted exactly as if this client had caught it (:meth:`SequenceManager.convict`). Otherwise (the
   replica agrees with neither) nothing is decided.

At most ``report_checks`` reports are re-checked per minute (a recompute is a forward through the blocks);
the rest wait for a later round. Reporters are keys anyone can make, so ignoring a reporter only spares
re-checks of its other reports; the bound on re-checks is what limits a flood.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict, deque

from corolla.engine.client.context import ClientContext
from corolla.engine.client.spot_check import peer_groups, recompute
from corolla.engine.client.verify import outputs_agree, tolerance
from corolla.engine.dht.announce import read_published_reports
from corolla.engine.dht.report_records import PublishedReport
from corolla.engine.errors import short_peer
from corolla.engine.routing.trust import choose_auditor
from corolla.engine.wire.commitment import verify_commitment

__all__ = ["ReportChecker"]

logger = logging.getLogger(__name__)

MAX_REMEMBERED = 4096
"""Reports and reporters remembered at most (the oldest are forgotten first)."""
CHECK_WINDOW_S = 60.0


class ReportChecker:
    """Reads the swarm's liar reports of one model, re-checks new ones and convicts the liars they prove.

    Attributes:
        convicted: Servers convicted on a report, with the monotonic time of the conviction.
        ignored: Reporters caught forging or smearing (their reports are no longer read).
        forged: Reports dropped because the accused's signature did not verify.
        smears: Reports dropped because the accused's output was right.
    """

    def __init__(self, context: ClientContext, hidden_size: int | None = None) -> None:
        self.context = context
        self.hidden_size = hidden_size  # the model's: evidence of another width is no step of this model
        self.convicted: dict[str, float] = {}
        self.ignored: OrderedDict[str, None] = OrderedDict()
        self.forged = 0
        self.smears = 0
        self._seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()  # (subkey, accused's signature)
        self._checks: deque[float] = deque()  # monotonic times of the re-checks of the last minute
        self._rng = random.Random()
        self._refreshed = -float("inf")  # monotonic time this checker last re-read the swarm's servers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Read reports now and every ``report_refresh`` seconds, in a daemon thread, until :meth:`stop`."""
        if self._thread is None and self.context.config.report_refresh > 0:
            self._thread = threading.Thread(target=self._run, name="corolla-reports", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop reading (waits a few seconds for a re-check in progress)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception as e:  # a DHT hiccup: try again next round
                logger.info("reading liar reports: %s", e)
            self._stop.wait(self.context.config.report_refresh)

    def check_once(self) -> None:
        """Read the model's reports and re-check the new ones (as far as the per-minute bound allows)."""
        manager = self.context.manager
        reports = read_published_reports(manager.dht, manager.model, timeout=self.context.config.request_timeout)
        known, now = manager.spans, time.monotonic()
        unknown = any(r.accused not in known and r.reporter not in self.ignored for r in reports)
        if unknown and now - self._refreshed > self.context.config.update_period:
            manager.refresh()  # a server this client has not read yet (or a fresh client that read nobody)
            self._refreshed = now
        for report in reports:
            if self._stop.is_set():
                return
            self._consider(report)

    def _consider(self, report: PublishedReport) -> None:
        manager, config = self.context.manager, self.context.config
        key = (report.subkey, report.commitment)
        if key in self._seen or report.reporter in self.ignored or report.accused in self.convicted:
            return
        span = manager.span(report.accused)
        if report.end > manager.num_blocks or span is None or not span.start <= report.start < report.end <= span.end:
            return  # not a server this client would route those blocks through (now): read again later
        now = time.monotonic()
        while self._checks and self._checks[0] < now - CHECK_WINDOW_S:
            self._checks.popleft()
        if len(self._checks) >= config.report_checks:
            return  # over this minute's bound: the next rounds get to it
        self._remember(self._seen, key)
        if self.hidden_size is not None and report.inputs.shape[2] != self.hidden_size:
            self.forged += 1  # its signature may be real (a liar signing for an accomplice): still no evidence
            self._remember(self.ignored, report.reporter)
            logger.info(
                "ignoring reporter %s: its report on %s holds states %d wide, not this model's %d",
                short_peer(report.reporter),
                short_peer(report.accused),
                report.inputs.shape[2],
                self.hidden_size,
            )
            return
        if not verify_commitment(
            report.accused,
            report.commitment,
            model=report.model,
            start=report.start,
            end=report.end,
            inputs=report.inputs,
            output=report.claimed,
        ):
            self.forged += 1
            self._remember(self.ignored, report.reporter)
            logger.info(
                "ignoring reporter %s: its report on %s carries no valid signature of the accused",
                short_peer(report.reporter),
                short_peer(report.accused),
            )
            return
        self._checks.append(now)
        self._recheck(report)

    def _recheck(self, report: PublishedReport) -> None:
        """Recompute the reported step on a replica of another address group and decide."""
        context, manager, config = self.context, self.context.manager, self.context.config
        accused_span = manager.span(report.accused)
        quant = accused_span.record.quant if accused_span is not None else "none"
        groups = context.loop.run(peer_groups(context), timeout=config.request_timeout)
        candidates = manager.replicas(
            report.start, report.end, {report.accused}, adapter=config.active_adapter, quant=quant
        )
        accused_group = groups.get(report.accused, report.accused)
        witness_groups = {groups.get(w, w) for w in report.witnesses}
        pick = None
        for exclude in ({accused_group, *witness_groups}, {accused_group}):
            pick = choose_auditor(candidates, record={}, groups=groups, exclude_groups=exclude, rng=self._rng)
            if pick is not None:
                break
        if pick is None:
            self._seen.pop((report.subkey, report.commitment), None)  # no replica now: try again later
            logger.debug("no replica outside %s's group to re-check a report", short_peer(report.accused))
            return
        try:
            full = context.loop.run(
                recompute(context, [(pick, report.start, report.end)], report.inputs), timeout=config.request_timeout
            )
        except Exception as e:  # the replica failed: no opinion, try again later
            self._seen.pop((report.subkey, report.commitment), None)
            logger.info("re-checking a report on %s via %s failed: %s", short_peer(report.accused), short_peer(pick), e)
            return
        mine = full[:, -report.claimed.shape[1] :]
        dtypes = {span.record.dtype if span is not None else "unknown" for span in (accused_span, manager.span(pick))}
        rel_tol = tolerance(dtypes)
        if outputs_agree(report.claimed, mine, rel_tol):
            self.smears += 1
            self._remember(self.ignored, report.reporter)
            logger.warning(
                "ignoring reporter %s: %s's output it reported was right (re-checked via %s)",
                short_peer(report.reporter),
                short_peer(report.accused),
                short_peer(pick),
            )
        elif outputs_agree(report.honest, mine, rel_tol):
            self.convicted[report.accused] = time.monotonic()
            manager.convict(
                report.accused,
                report.start,
                report.end,
                f"a report by {short_peer(report.reporter)}, re-checked via {short_peer(pick)}",
            )
        else:
            logger.info("a report on %s is undecided: %s agrees with neither side", short_peer(report.accused), pick)

    @staticmethod
    def _remember(table: OrderedDict, key: object) -> None:  # type: ignore[type-arg]
        table[key] = None
        table.move_to_end(key)
        while len(table) > MAX_REMEMBERED:
            table.popitem(last=False)
