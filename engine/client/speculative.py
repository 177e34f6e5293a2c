"""Speculative decoding: a small local draft model proposes tokens, the swarm checks them all in one step.

Each round the draft proposes ``k`` tokens after the last accepted one; the client sends that token and the
``k`` drafts through the route as one multi-token step (one round trip per hop instead of ``k + 1``) and gets
the target model's logits at every position. It keeps the longest run of drafts the target agrees with, plus
the target's own next token, and rewinds the session to the tokens it kept: the next step is sent at that
position, and every server drops the rejected tokens from its cache before running it (the ``position`` of
a step, see ``wire/messages.py``). The replay history of every hop is cut the same way
(:meth:`InferenceSession.rewind`), so a failover replays accepted tokens only.

Greedy decoding gives exactly the tokens of plain greedy decoding, whatever the draft proposes. Sampling
uses the standard speculative sampling rule (Leviathan et al. 2023; Chen et al. 2023): a draft token ``d``
drawn from the draft's distribution ``q`` is kept with probability ``min(1, p(d) / q(d))`` under the target's
``p``; at the first rejection the token is drawn from ``max(0, p - q)`` renormalized, so every token is
distributed exactly as plain sampling from ``p`` (with the same temperature, top-k, top-p and repetition
penalty applied to both models). With a seed, the samples differ from plain sampling's (same distribution).
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch

from corolla.engine.client.generation import check_retractions
from corolla.engine.client.inputs import to_wire
from corolla.engine.client.sampling import SamplingParams, next_tokens, token_probs
from corolla.engine.client.session import InferenceSession
from corolla.engine.client.text import FinishReason, Rewind
from corolla.engine.errors import CorollaError, OutputRetracted
from corolla.engine.models.checkpoint import ClientHead

DEFAULT_DRAFT_TOKENS = 4  # tokens the draft proposes per round
MAX_DRAFT_TOKENS = 64


@dataclass
class SpeculationStats:
    """What a drafter's rounds achieved (cumulative over every generation that used it)."""

    rounds: int = 0  # verification steps sent through the swarm
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target agreed with

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens that were accepted (0 before any round)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens generated per verification step: accepted drafts plus the target's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


class Drafter:
    """A local draft model for speculative decoding (transformers calls it the assistant model).

    Any causal LM that runs here and shares the swarm model's tokenizer (e.g. a small model of the same
    family, or the first blocks of the target with its head): ``model(input_ids=..., cache=..., use_cache=True)``
    (``past_key_values=`` before transformers 5.24) must return ``.logits``. It runs in eval mode, without
    gradients, on its own device.
    One drafter serves any number of generations at once (each keeps its own draft cache).

    ``num_tokens`` drafts are proposed in a generation's first round; with ``adaptive`` (transformers'
    "heuristic" schedule) a round whose drafts were all accepted proposes 2 more next time, any other round
    1 fewer (at least 1), so a draft that is often wrong costs little and one that is right goes further.
    """

    def __init__(self, model: Any, num_tokens: int = DEFAULT_DRAFT_TOKENS, *, adaptive: bool = True) -> None:
        if isinstance(model, str | os.PathLike):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(os.fspath(model))
        if not callable(model) or getattr(model, "config", None) is None:
            raise TypeError(
                f"a draft model must be a transformers causal LM (or its checkpoint path), got {type(model).__name__}"
            )
        check_draft_tokens(num_tokens)
        self.model = model.eval()
        self.num_tokens = num_tokens
        self.adaptive = adaptive
        self.vocab_size = int(_text_config(model.config).vocab_size)
        self.stats = SpeculationStats()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Drafter({type(self.model).__name__}, num_tokens={self.num_tokens}, adaptive={self.adaptive})"

    @property
    def device(self) -> torch.device:
        """Where the draft model runs."""
        return next(self.model.parameters()).device

    def check_vocab(self, target_vocab: int, tokenizer_size: int | None) -> None:
        """Refuse a draft whose vocabulary cannot be the target's (ValueError)."""
        needed = tokenizer_size if tokenizer_size is not None else target_vocab
        if self.vocab_size < needed or (tokenizer_size is None and self.vocab_size != target_vocab):
            raise ValueError(
                f"the draft model's vocabulary has {self.vocab_size} tokens, the swarm model's "
                f"{tokenizer_size if tokenizer_size is not None else target_vocab}: a draft must share the "
                "target's tokenizer (use a smaller model of the same family)"
            )

    def count(self, drafted: int, accepted: int) -> None:
        """Count one verification round."""
        with self._lock:
            self.stats.rounds += 1
            self.stats.drafted += drafted
            self.stats.accepted += accepted

    def run(self, vocab_size: int) -> DraftRun:
        """A fresh draft cache for one generation, proposing over the target's ``vocab_size`` tokens."""
        return DraftRun(self.model, self.device, vocab_size)


def check_draft_tokens(num_tokens: int) -> None:
    """Drafts per round must be between 1 and ``MAX_DRAFT_TOKENS``."""
    if not isinstance(num_tokens, int) or not 1 <= num_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {num_tokens!r}")


def next_draft_tokens(current: int, drafted: int, accepted: int) -> int:
    """Drafts to propose next round after ``accepted`` of ``drafted`` were kept (the adaptive schedule)."""
    if drafted and accepted == drafted:
        return min(MAX_DRAFT_TOKENS, current + 2)
    return max(1, current - 1) if drafted else current


def as_drafter(draft: Any, num_tokens: int | None = None) -> Drafter | None:
    """``draft`` as a :class:`Drafter`: None stays None, a Drafter is kept, a model or a path is wrapped."""
    if draft is None or isinstance(draft, Drafter):
        return draft
    return Drafter(draft, num_tokens or DEFAULT_DRAFT_TOKENS)


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


class DraftRun:
    """The draft model's cache for one generation: it feeds only the ids it does not hold yet."""

    def __init__(self, model: Any, device: torch.device, vocab_size: int) -> None:
        self.model = model
        self.device = device
        self.vocab_size = vocab_size
        self._cache: Any = None
        # transformers 5.24 renamed the cache keyword of its models' forward (the old name warns until 5.40)
        forward = getattr(model, "forward", model)
        try:
            takes_cache = "cache" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            takes_cache = False
        self._cache_keyword = "cache" if takes_cache else "past_key_values"
        self._held = torch.zeros((1, 0), dtype=torch.long)  # [1, n] ids the cache holds

    @torch.inference_mode()
    def _last_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[1, n] ids (CPU) → the draft's [1, vocab] float32 logits after them (CPU, fitted to the target's vocab)."""
        held = self._held
        n = min(held.shape[1], ids.shape[1] - 1)  # feed at least one token
        same = int((held[0, :n] == ids[0, :n]).long().cumprod(0).sum()) if n > 0 else 0
        if self._cache is None or (same < held.shape[1] and not _crop(self._cache, same)):
            self._cache, same = None, 0
        from transformers import DynamicCache

        cache = self._cache if self._cache is not None else DynamicCache()
        out = self.model(input_ids=ids[:, same:].to(self.device), **{self._cache_keyword: cache}, use_cache=True)
        self._cache = cache  # the model appended to it in place
        self._held = ids
        logits: torch.Tensor = out.logits[:, -1].float().cpu()
        return _fit(logits, self.vocab_size)

    def propose(
        self, ids: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k`` draft tokens after ``ids`` [1, n] (CPU): ([1, k] ids, [k, vocab] draft probabilities when sampling)."""
        drafts: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            logits = self._last_logits(ids)
            if params.do_sample:
                q = token_probs(logits, ids, params)
                token = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                probs.append(q[0])
            else:
                token = next_tokens(logits, ids, params)
            drafts.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
        return torch.stack(drafts, dim=1), torch.stack(probs) if probs else None


def _fit(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[1, draft vocab] logits cut or padded (never chosen) to the target's ``vocab_size``."""
    if logits.shape[-1] >= vocab_size:
        return logits[..., :vocab_size]
    pad = logits.new_full((*logits.shape[:-1], vocab_size - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def _crop(cache: Any, length: int) -> bool:
    """Keep the first ``length`` tokens of a transformers DynamicCache in place; False if it is another kind
    (sliding windows, recurrent states: the caller then recomputes the draft's cache from scratch)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return False
    for layer in layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
    return True


# ---- acceptance (pure) -----------------------------------------------------------------------
def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """Tokens a greedy round yields: the drafts up to the first one the target disagrees with, then the
    target's own token there. ``targets[i]`` is the target's choice after the first ``i`` drafts (k + 1 of them)."""
    for i, d in enumerate(drafts):
        if d != targets[i]:
            return [*drafts[:i], targets[i]]
    return [*drafts, targets[len(drafts)]]


def accept_sampled(
    drafts: list[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None
) -> list[int]:
    """Tokens a sampling round yields (speculative sampling): ``q`` [k, vocab] the draft's probabilities each
    draft was drawn from, ``p`` [k + 1, vocab] the target's after the first ``i`` drafts (CPU)."""
    for i, d in enumerate(drafts):
        u = float(torch.rand((), generator=generator))
        if u * float(q[i, d]) < float(p[i, d]):  # kept with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection was a rounding accident
            residual = p[i]
        token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return [*drafts[:i], token]
    return [*drafts, int(torch.multinomial(p[len(drafts)], 1, generator=generator))]


# ---- the token loop --------------------------------------------------------------------------
@torch.inference_mode()
def speculative_loop(
    head: ClientHead,
    session: InferenceSession,
    new_ids: torch.Tensor,
    params: SamplingParams,
    max_new_tokens: int,
    eos_ids: set[int],
    *,
    drafter: Drafter,
    num_tokens: int,
    wire_dtype: str,
    prefix: torch.Tensor | None = None,
) -> Generator[torch.Tensor | Rewind, None, FinishReason]:
    """Like :func:`~corolla.engine.client.generation.token_loop` for one sequence, with a draft model:
    feed ``new_ids`` [1, n] (CPU), then yield tokens ([1], CPU), several per round trip when the draft is right.

    Audits work as in ``token_loop``: when one catches a server lying, the loop yields :class:`Rewind` (the
    generated tokens that stay) and goes on from the first untrue output; it ends only once every output it
    used is audited."""
    if new_ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding runs one sequence at a time, got a batch of {new_ids.shape[0]}: "
            "generate each sequence on its own, or drop draft_model"
        )
    check_draft_tokens(num_tokens)
    device = head.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    feed = session.take_pending(new_ids)
    if feed.shape[1] == 0:
        raise ValueError("nothing to generate from: give at least one input token")
    held = 0 if session.token_ids is None else session.token_ids.shape[1]
    seen = feed[:, :0] if session.token_ids is None else session.token_ids  # ids the servers hold
    prompt = held + feed.shape[1]  # ids given (or fed before): never withdrawn
    first = session.position  # position of the first fed id (after the prefix, if any)
    pre = 0 if prefix is None else prefix.shape[1]
    if max_new_tokens < 1:
        return "length"
    draft = drafter.run(head.lm_head.out_features)
    produced = retractions = 0
    pending: torch.Tensor | None = feed  # ids to feed as a plain step (the prompt, or again after a rewind)
    emitted: list[int] = []
    done: FinishReason | None = None

    def withdrawn(e: OutputRetracted, upto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """After a retraction (the session rewound to ``e.position``): the ids still held and those to feed."""
        if e.position < first + pre:
            raise CorollaError("an audit withdrew outputs before this generation's tokens; start a new session") from e
        index = held + e.position - first - pre  # the id at position e.position (computed from true outputs)
        keep = min(upto.shape[1], max(prompt, index + 1))
        session.record_fed(upto[:, :index])
        return upto[:, :index], upto[:, index:keep]

    while True:
        try:
            if pending is not None:
                embeds = head.embed(pending.to(device))
                if prefix is not None:
                    embeds = torch.cat([prefix.detach().to(embeds.device, embeds.dtype), embeds], dim=1)
                hidden = session.step(to_wire(embeds, wire_dtype))
                prefix = None
                seen = torch.cat([seen, pending], dim=1)
                session.record_fed(seen)
                pending = None
                logits = head.logits(hidden[:, -1:].to(device))[:, -1].float().cpu()
                emitted = [int(next_tokens(logits, seen, params, generator)[0])]
                done = None
            if done is None:
                session.hold_pending(torch.tensor([[emitted[-1]]]))  # sampled, not yet in the servers' caches
                for token in emitted:
                    produced += 1
                    yield torch.tensor([token])
                    if token in eos_ids:
                        done = "eos"
                        break
                if done is None and produced >= max_new_tokens:
                    done = "length"
            if done is not None:
                session.audit()  # raises if a server lied: the tokens from its outputs are withdrawn below
                return done
            last = torch.tensor([[emitted[-1]]])
            context = torch.cat([seen, last], dim=1)
            room = session.max_length - session.position - 1  # drafts the session can take after ``last``
            k = max(0, min(num_tokens, max_new_tokens - produced - 1, room))
            drafts, q = draft.propose(context, k, params, generator) if k else (last[:, :0], None)
            position = session.position
            hidden = session.step(to_wire(head.embed(torch.cat([last, drafts], dim=1).to(device)), wire_dtype))
        except OutputRetracted as e:
            retractions += 1
            check_retractions(retractions, e)
            if pending is not None:  # the plain step failed: its ids were never held
                upto = torch.cat([seen, pending], dim=1)
            else:  # ``emitted[-1]`` was sampled and not yet fed
                upto = torch.cat([seen, torch.tensor([emitted[-1:]])], dim=1)
            seen, pending = withdrawn(e, upto)
            kept = seen.shape[1] + pending.shape[1] - prompt
            emitted, done = [], None
            if kept < produced:
                produced = kept
                yield Rewind(produced)
            continue
        logits = head.logits(hidden.to(device))[0].float().cpu()  # [k + 1, vocab]: after last, d1, .., dk
        ids = [int(t) for t in drafts[0]]
        befores = [torch.cat([context, drafts[:, :i]], dim=1) for i in range(k + 1)]  # what position i follows
        if params.do_sample:
            p = torch.cat([token_probs(logits[i : i + 1], befores[i], params) for i in range(k + 1)])
            emitted = accept_sampled(ids, q if q is not None else p[:0], p, generator)
        else:
            targets = [int(next_tokens(logits[i : i + 1], befores[i], params)[0]) for i in range(k + 1)]
            emitted = accept_greedy(ids, targets)
        drafter.count(k, len(emitted) - 1)
        if drafter.adaptive:
            num_tokens = next_draft_tokens(num_tokens, k, len(emitted) - 1)
        emitted = _until_eos(emitted, eos_ids)
        # The servers hold ``last`` and every draft; keep ``last`` and the drafts yielded before the final token.
        kept = len(emitted)  # ``last`` + ``len(emitted) - 1`` drafts
        if kept < k + 1:
            session.rewind(position + kept)
        seen = torch.cat([context, drafts[:, : kept - 1]], dim=1)
        session.record_fed(seen)


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence id."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens
