"""Exact-only routing: a client that asks for it uses only servers whose blocks are not quantized."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from corolla.engine.errors import short_peer
from corolla.engine.routing.spans import RemoteSpan

logger = logging.getLogger(__name__)

EXACT = "none"  # the quantization an exact server announces (records without the field are exact too)


def exact_spans(spans: Mapping[str, RemoteSpan]) -> dict[str, RemoteSpan]:
    """The spans of servers announcing unquantized blocks (``quant == "none"``); logs the ones left out."""
    kept = {peer: span for peer, span in spans.items() if span.record.quant == EXACT}
    skipped = sorted(set(spans) - set(kept))
    if skipped:
        names = ", ".join(f"{short_peer(p)} ({spans[p].record.quant})" for p in skipped)
        logger.debug("require_exact: not routing through quantized servers %s", names)
    return kept
