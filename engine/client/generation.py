"""The token loop: feed token ids through a session, sample the next ones, keep the session's ids in step.

Embeddings, logits and sampling run on the head's device; hidden states go to the servers from CPU
memory; the session's token bookkeeping stays on the CPU.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from corolla.engine.client.inputs import to_wire
from corolla.engine.client.sampling import SamplingParams, next_tokens
from corolla.engine.client.session import InferenceSession
from corolla.engine.client.step_batch import DecodeBatcher
from corolla.engine.client.text import FinishReason, Rewind
from corolla.engine.errors import CorollaError, OutputRetracted
from corolla.engine.models.checkpoint import ClientHead

MAX_RETRACTIONS = 8
"""Audits that may catch a liar within one generation before it gives up (each catch moves off a server)."""


def check_retractions(retractions: int, caught: OutputRetracted) -> None:
    """Give up once audits have caught servers lying more than :data:`MAX_RETRACTIONS` times in one
    generation (each catch moves off a server; this many means the swarm is under attack)."""
    if retractions > MAX_RETRACTIONS:
        raise CorollaError(
            f"audits caught servers lying {retractions} times in one generation; the swarm may be under attack: "
            "try again later or use servers you trust (a private swarm)"
        ) from caught


@torch.inference_mode()
def token_loop(
    head: ClientHead,
    session: InferenceSession,
    new_ids: torch.Tensor,
    params: SamplingParams,
    max_new_tokens: int,
    eos_ids: set[int],
    *,
    pad_id: int | None,
    wire_dtype: str,
    prefix: torch.Tensor | None = None,
    batcher: DecodeBatcher | None = None,
) -> Generator[torch.Tensor | Rewind, None, FinishReason]:
    """Feed ``new_ids`` [batch, n] (CPU), then yield one sampled token per row per step ([batch], CPU).

    ``prefix`` ([batch, pre, hidden], e.g. trained soft prompts) goes to the servers before the first
    fed token, in the same step. Finished rows get ``pad_id`` (the first end-of-sequence id, or 0, if None).
    When an audit catches a server lying (:class:`~corolla.engine.errors.OutputRetracted`), the loop yields
    :class:`Rewind` and generates again from the first untrue output; the loop ends only once every output
    it used is audited (:meth:`InferenceSession.audit`), so what it leaves standing is what honest servers
    compute.
    With a ``batcher``, one-token steps run together with other sessions' of the same client and route.
    """
    try:
        return (
            yield from _steps(
                head, session, new_ids, params, max_new_tokens, eos_ids, pad_id, wire_dtype, prefix, batcher
            )
        )
    finally:
        if batcher is not None:
            batcher.leave(session)


def _steps(
    head: ClientHead,
    session: InferenceSession,
    new_ids: torch.Tensor,
    params: SamplingParams,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int | None,
    wire_dtype: str,
    prefix: torch.Tensor | None,
    batcher: DecodeBatcher | None,
) -> Generator[torch.Tensor | Rewind, None, FinishReason]:
    device = head.embed_tokens.weight.device
    generator = torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None
    feed = session.take_pending(new_ids)
    held = 0 if session.token_ids is None else session.token_ids.shape[1]
    seen = feed if session.token_ids is None else torch.cat([session.token_ids, feed], dim=1)
    prompt = seen.shape[1]  # ids given (or fed before): never withdrawn
    first = session.position  # position of seen[:, held] (the prefix, if any, comes first)
    pre = 0 if prefix is None else prefix.shape[1]
    prompts = prefix
    finished = torch.zeros(feed.shape[0], dtype=torch.bool)
    pad = pad_id if pad_id is not None else next(iter(eos_ids), 0)
    generated = retractions = 0
    while True:
        if generated >= max_new_tokens or bool(finished.all()):
            try:
                session.audit()
            except OutputRetracted as caught:
                e = caught
                retractions += 1
            else:
                return "eos" if bool(finished.all()) else "length"
        else:
            if feed.shape[1] == 0:
                raise ValueError("nothing to generate from: give at least one input token")
            try:
                logits = batcher.logits(session, feed) if batcher is not None and prefix is None else None
                if logits is None:
                    embeds = head.embed(feed.to(device))
                    if prefix is not None:
                        embeds = torch.cat([prefix.detach().to(embeds.device, embeds.dtype), embeds], dim=1)
                        prefix = None
                    hidden = session.step(to_wire(embeds, wire_dtype))
                    logits = head.logits(hidden[:, -1:].to(device))[:, -1]
                else:
                    session.audit_scheduled()  # a step taken in a batched round: its audits, if due
            except OutputRetracted as caught:
                e = caught
                retractions += 1
            else:
                session.record_fed(seen)
                token = next_tokens(logits, seen.to(device), params, generator).cpu()
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= torch.tensor([int(t) in eos_ids for t in token])
                session.hold_pending(token[:, None])  # sampled, not yet in the servers' caches
                yield token
                generated += 1
                feed = token[:, None]
                seen = torch.cat([seen, feed], dim=1)
                continue
        check_retractions(retractions, e)
        # Outputs before e.position are audited: the token sampled from the one before it is true.
        if pre and e.position < first + pre:  # into the soft prompt: send it whole again
            if e.position < first:
                raise CorollaError(
                    "an audit withdrew outputs before this generation's prompt; start a new session"
                ) from e
            session.rewind(first)
            start, prefix = held, prompts
        else:
            start = e.position - (first - held) - (pre if e.position >= first else 0)
        keep = min(seen.shape[1], max(prompt, start + 1))
        seen, feed = seen[:, :keep], seen[:, start:keep]
        session.record_fed(seen[:, :start])
        if keep - prompt < generated:
            generated = keep - prompt
            kept = seen[:, prompt:]
            finished = torch.tensor([any(int(t) in eos_ids for t in row) for row in kept], dtype=torch.bool)
            yield Rewind(generated)


def eos_ids(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None, eos_token_id: int | Sequence[int] | None
) -> set[int]:
    """The ids that end a sequence: ``eos_token_id`` if given, else the model config's, else the tokenizer's."""
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}
