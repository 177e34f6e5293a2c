"""The client-side model: embeddings and LM head here, every transformer block in the swarm."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from collections.abc import Generator, Sequence
from typing import Any, Self

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.engine.client.context import ClientContext, OnClient
from corolla.engine.client.forward import stateless_forward
from corolla.engine.client.generation import eos_ids, token_loop
from corolla.engine.client.inputs import check_ids, check_unsupported, to_wire
from corolla.engine.client.joining import client_config, load_client, release
from corolla.engine.client.loop import LoopThread
from corolla.engine.client.ptune import PromptTuning
from corolla.engine.client.report_check import ReportChecker
from corolla.engine.client.reporting import finish_publishing
from corolla.engine.client.route_autograd import RemoteBlocks
from corolla.engine.client.sampling import SamplingParams, sampling_params
from corolla.engine.client.session import ActiveSession, InferenceSession
from corolla.engine.client.speculative import (
    DEFAULT_DRAFT_TOKENS,
    Drafter,
    as_drafter,
    check_draft_tokens,
    speculative_loop,
)
from corolla.engine.client.step_batch import DecodeBatcher
from corolla.engine.client.text import FinishReason, GenerationResult, Rewind, TextStream
from corolla.engine.client.training import (
    TrainingPath,
    check_tuned_generate,
    check_tuned_session,
    make_prompt_tuning,
)
from corolla.engine.config import ClientConfig
from corolla.engine.errors import CorollaError
from corolla.engine.models.checkpoint import ClientHead
from corolla.engine.models.recurrent import keeps_recurrent_state

logger = logging.getLogger(__name__)

Messages = Sequence[dict[str, str]]


class DistributedModelForCausalLM(OnClient, nn.Module):
    """A causal LM whose blocks run on swarm servers. Build it with :meth:`from_pretrained`.

    A torch module like a transformers model: ``.to(device)``, ``.cuda()``, ``.half()``, ``.eval()``
    move or cast what runs here (embeddings, final norm, LM head; see :meth:`parameters`), and
    ``model(input_ids).logits`` is a stateless forward. Token ids may live on any device: outputs come
    back on the inputs' device, hidden states travel to the servers from CPU memory.

    Thread-safe: every call opens its own inference session unless given one (or, for :meth:`generate`,
    unless the calling thread is inside ``with model.inference_session(...)``).
    """

    def __init__(
        self,
        model_name: str,
        config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerBase | None,
        head: ClientHead,
        context: ClientContext,
        dht: Any,
        drafter: Drafter | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.config = config
        self._tokenizer = tokenizer
        self.head = head  # a registered submodule: .to(), .parameters() and state_dict() reach it
        self.ptune: PromptTuning | None = None  # trainable soft prompts (see enable_prompt_tuning)
        self.context = context  # settings, routes, P2P replica and loop, shared with sessions and remote blocks
        self.dht = dht
        if drafter is not None:
            drafter.check_vocab(int(config.vocab_size), len(tokenizer) if tokenizer is not None else None)
        # The local draft model of speculative decoding (None: plain decoding); its ``stats`` count the rounds.
        self.drafter = drafter
        self._training_path = TrainingPath(head, context)  # differentiable forwards (training, prompt tuning)
        self._active = threading.local()  # per thread: the sessions entered with `with`, innermost last
        # One-token steps of this model's concurrent sessions (one thread each) travel together.
        self.decode_batcher = DecodeBatcher(head, context, context.config.wire_dtype)
        # Runs on close() or, if the user never closes, at interpreter exit (before hivemind's own
        # finalizers would complain about a missing event loop).
        # Re-checks the swarm's liar reports and avoids the liars they prove (client/report_check.py).
        self.report_checker = ReportChecker(context, head.embed_tokens.embedding_dim)
        self.report_checker.start()
        self._finalizer = weakref.finalize(self, _leave, self.report_checker, context.loop, context.p2p, dht)

    @property
    def client_config(self) -> ClientConfig:
        """The settings this client runs with."""
        return self.context.config

    @property
    def remote_blocks(self) -> RemoteBlocks:
        """The swarm access of training forwards (its ``last_trace`` shows which servers ran the last one)."""
        return self._training_path.blocks

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (raises if the checkpoint has none)."""
        if self._tokenizer is None:
            raise CorollaError(f"{self.model_name} has no tokenizer files; use generate() with token ids")
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        """Where the local embeddings and head are (and where logits are computed)."""
        return self.head.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the local embeddings and head."""
        return self.head.embed_tokens.weight.dtype

    def __repr__(self) -> str:
        return f"DistributedModelForCausalLM({self.model_name!r}, blocks={self.config.num_hidden_layers})"

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str,
        *,
        initial_peers: Sequence[str] | str | None = None,
        token: str | None = None,
        revision: str | None = None,
        config: ClientConfig | None = None,
        swarm_key: str | os.PathLike[str] | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 16,
        draft: Any = None,
        num_draft_tokens: int | None = None,
        **client_config_overrides: Any,
    ) -> Self:
        """Load embeddings, head and tokenizer locally and join the swarm that serves the blocks.

        Args:
            model_name_or_path: a local checkpoint folder or a Hugging Face repo id.
            initial_peers: multiaddrs of any peers of the swarm (default: ``COROLLA_INITIAL_PEERS``).
            token: Hugging Face token for gated repos (default: ``HF_TOKEN`` or the saved login). It is
                used only to download from the Hub and never sent to swarm peers.
            revision: Hub revision (branch, tag or commit).
            config: a full ClientConfig; ``client_config_overrides`` set single fields instead.
            swarm_key: the key file of a private swarm (``corolla swarm-key new``; default:
                ``COROLLA_SWARM_KEY_FILE``, or none for a public swarm).
            tuning_mode: ``"ptune"`` or ``"deep_ptune"`` adds ``pre_seq_len`` trainable prompts (see
                :meth:`enable_prompt_tuning`); the local embeddings and head stay frozen either way.
            pre_seq_len: number of prompt positions.
            draft: a local draft model for speculative decoding (a transformers causal LM sharing the
                tokenizer, its checkpoint path, or a :class:`~corolla.engine.client.speculative.Drafter`):
                ``generate`` and the text methods then decode with it by default (one sequence at a time).
            num_draft_tokens: tokens the draft proposes per round (default 4).
        """
        if swarm_key is not None:
            client_config_overrides["swarm_key_file"] = os.fspath(swarm_key)
        config = client_config(initial_peers, config, **client_config_overrides)
        parts = load_client(model_name_or_path, config, token=token, revision=revision)
        drafter = as_drafter(draft, num_draft_tokens)
        model = cls(parts.model_name, parts.config, parts.tokenizer, parts.head, parts.context, parts.dht, drafter)
        if tuning_mode is not None:
            model.enable_prompt_tuning(tuning_mode, pre_seq_len)
        return model

    def enable_prompt_tuning(self, tuning_mode: str, pre_seq_len: int = 16) -> PromptTuning:
        """Add trainable prompts: ``ptune`` (before the input) or ``deep_ptune`` (also one set per block).

        The input prompts start as the embeddings of ``pre_seq_len`` random vocabulary tokens; deep prompts
        start at zero. ``model.ptune.save(path)`` / ``.load(path)`` keep trained prompts.
        """
        self.ptune = make_prompt_tuning(self.head, self.config, tuning_mode, pre_seq_len)
        return self.ptune

    def close(self) -> None:
        """Leave the swarm (idempotent)."""
        self._finalizer()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- sessions and raw forward -----------------------------------------------------------
    def inference_session(self, max_length: int | None = None, active_adapter: str | None = None) -> InferenceSession:
        """Open a session whose servers keep the attention cache of up to ``max_length`` tokens.

        ``active_adapter`` picks a LoRA adapter for this session (default: the model's ``active_adapter``);
        its route goes only through servers that announce it.

        Inside ``with model.inference_session(...):`` it is this thread's :attr:`active_session`:
        :meth:`generate` without ``session=`` continues it (as in Petals).
        """
        max_length = max_length or min(int(getattr(self.config, "max_position_embeddings", 2048)), 2048)
        context = self.context
        if active_adapter is not None:
            context = context.with_config(dataclasses.replace(context.config, active_adapter=active_adapter))
        return ActiveSession(self._active, context, max_length, recurrent=keeps_recurrent_state(self.config))

    @property
    def active_session(self) -> InferenceSession | None:
        """The innermost session this thread entered with ``with model.inference_session(...)``, if any."""
        stack: list[InferenceSession] = getattr(self._active, "stack", [])
        return stack[-1] if stack else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **unused: Any,
    ) -> CausalLMOutputWithPast:
        """Stateless full forward, as ``model(input_ids)``: [batch, length] ids → ``.logits`` [batch, length, vocab].

        Returns a transformers ``CausalLMOutputWithPast`` (float32 logits on the device of ``input_ids``;
        no cache: use :meth:`inference_session` or :meth:`generate` for incremental decoding). With
        ``labels`` [batch, length] it also has ``.loss`` (next-token cross-entropy, -100 skipped). With
        trainable prompts (or local parameters made trainable) under grad mode the forward is
        differentiable: ``loss.backward()`` runs backward through the remote blocks.
        """
        check_unsupported(unused)
        check_ids(input_ids, attention_mask)
        if labels is not None or self.ptune is not None or self._needs_autograd():
            return self._training_path.forward(input_ids, labels, self.ptune)
        with torch.no_grad():
            return self._plain_forward(input_ids)

    def _needs_autograd(self) -> bool:
        """Whether a forward must be differentiable: grad mode on and some local parameter trainable."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _plain_forward(self, input_ids: torch.Tensor) -> CausalLMOutputWithPast:
        """The inference forward: stateless, chunked by the servers, no gradients."""
        hidden = to_wire(self.head.embed(input_ids.to(self.device)), self.client_config.wire_dtype)
        logits = self.head.logits(stateless_forward(self.context, hidden).to(self.device))
        return CausalLMOutputWithPast(logits=logits.to(input_ids.device))

    # ---- token generation -------------------------------------------------------------------
    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        return eos_ids(self.config, self._tokenizer, eos_token_id)

    def _token_loop(
        self,
        session: InferenceSession,
        new_ids: torch.Tensor,
        params: SamplingParams,
        max_new_tokens: int,
        eos: set[int],
        prefix: torch.Tensor | None = None,
        drafter: Drafter | None = None,
        num_draft_tokens: int | None = None,
    ) -> Generator[torch.Tensor | Rewind, None, FinishReason]:
        """:func:`~corolla.engine.client.generation.token_loop` with this model's head, padding and wire dtype;
        :func:`~corolla.engine.client.speculative.speculative_loop` with a ``drafter``."""
        pad_id = self._tokenizer.pad_token_id if self._tokenizer is not None else None
        wire = self.client_config.wire_dtype
        if drafter is not None:
            num = num_draft_tokens or drafter.num_tokens
            return speculative_loop(
                self.head,
                session,
                new_ids,
                params,
                max_new_tokens,
                eos,
                drafter=drafter,
                num_tokens=num,
                wire_dtype=wire,
                prefix=prefix,
            )
        return token_loop(
            self.head,
            session,
            new_ids,
            params,
            max_new_tokens,
            eos,
            pad_id=pad_id,
            wire_dtype=wire,
            prefix=prefix,
            batcher=self.decode_batcher,
        )

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        session: InferenceSession | None = None,
        seed: int | None = None,
        max_length: int | None = None,
        attention_mask: torch.Tensor | None = None,
        streamer: Any = None,
        sampling: SamplingParams | None = None,
        draft_model: Any = None,
        assistant_model: Any = None,
        num_draft_tokens: int | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """transformers-style generation: returns ``input_ids`` followed by the new tokens.

        With ``session=``, ``input_ids`` are only the *new* tokens of this turn: earlier turns are
        already in the servers' caches (Petals' multi-turn convention), and ``None`` continues from the
        last generated token. ``streamer`` is any object with transformers' streamer interface
        (``put(ids)``, ``end()``), e.g. ``transformers.TextStreamer``. The result is on the device of
        ``input_ids`` (on the model's device when continuing with ``None``). ``sampling`` replaces
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty`` and ``seed``.

        ``draft_model`` (or transformers' name ``assistant_model``) decodes speculatively with a local draft
        model sharing the tokenizer (see :mod:`~corolla.engine.client.speculative`; default: the model's
        ``draft`` from :meth:`from_pretrained`, for single sequences): ``num_draft_tokens`` (or
        ``num_assistant_tokens``) tokens per round. Greedy output is the same as without a draft; sampling
        keeps the target's distribution.
        """
        params = sampling_params(sampling, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        drafter, num_draft_tokens = self._drafter_of(draft_model, assistant_model, num_draft_tokens, unused)
        if input_ids is None:
            input_ids = unused.pop("inputs", None)  # transformers' name of the first argument
        prefix = None
        if self.ptune is not None:
            in_session = session is not None or self.active_session is not None
            if self.ptune.deep is not None:  # deep prompts go with every forward: no cached sessions
                if draft_model is not None or assistant_model is not None:
                    raise ValueError("a deep_ptune model generates without a draft model: drop draft_model")
                input_ids = check_tuned_generate(input_ids, params.do_sample, in_session)
                check_ids(input_ids, attention_mask)
                return self._training_path.greedy_generate(input_ids, max_new_tokens, self.ptune)
            input_ids = check_tuned_session(input_ids, in_session)
            prefix = self.ptune.input_prompts(input_ids.shape[0])  # the prompts open the model's own session
        if unused:
            logger.debug("generate() ignores %s", ", ".join(unused))
        if session is None:
            session = self.active_session
        if input_ids is None:
            if session is None or session.pending_ids is None:
                raise ValueError("give input_ids (or a session with a pending token)")
            input_ids = torch.zeros((session.pending_ids.shape[0], 0), dtype=torch.long, device=self.device)
        check_ids(input_ids, attention_mask)
        if drafter is not None and input_ids.shape[0] != 1:
            if drafter is not self.drafter:  # asked for explicitly: say why it cannot be used
                raise ValueError(
                    f"speculative decoding runs one sequence at a time, got a batch of {input_ids.shape[0]}: "
                    "generate each sequence on its own, or drop draft_model"
                )
            drafter = None  # the model's default draft: batches decode plainly
        out_device = input_ids.device
        input_ids = input_ids.cpu()
        own = session is None
        if session is None:
            pre = 0 if prefix is None else prefix.shape[1]
            session = self.inference_session(pre + (max_length or input_ids.shape[1] + max_new_tokens))
        tokens: list[torch.Tensor] = []
        eos_ids = self._eos_ids(eos_token_id)
        try:
            if streamer is not None:
                streamer.put(input_ids)
            loop = self._token_loop(
                session, input_ids, params, max_new_tokens, eos_ids, prefix, drafter, num_draft_tokens
            )
            for token in loop:
                if isinstance(token, Rewind):  # an audit caught a liar: these tokens came from its outputs
                    if streamer is not None and len(tokens) > token.kept:
                        logger.warning("the streamer showed %d tokens that were withdrawn", len(tokens) - token.kept)
                    del tokens[token.kept :]
                    continue
                tokens.append(token)
                if streamer is not None:
                    streamer.put(token)
        finally:
            if own:
                session.close()
            if streamer is not None:
                streamer.end()
        new = torch.stack(tokens, dim=1) if tokens else input_ids[:, :0]
        return torch.cat([input_ids, new], dim=1).to(out_device)

    def _drafter_of(
        self, draft_model: Any, assistant_model: Any, num_draft_tokens: int | None, unused: dict[str, Any]
    ) -> tuple[Drafter | None, int | None]:
        """The draft (and drafts per round) a ``generate`` call asks for, under its own or transformers' names."""
        if draft_model is not None and assistant_model is not None and draft_model is not assistant_model:
            raise ValueError("give draft_model or assistant_model (the same thing), not both")
        num_assistant = unused.pop("num_assistant_tokens", None)
        if num_draft_tokens is None:
            num_draft_tokens = num_assistant
        if num_draft_tokens is not None:
            check_draft_tokens(num_draft_tokens)
        draft = draft_model if draft_model is not None else assistant_model
        if draft is None:
            return self.drafter, num_draft_tokens
        drafter = draft if isinstance(draft, Drafter) else Drafter(draft, num_draft_tokens or DEFAULT_DRAFT_TOKENS)
        tokenizer_size = len(self._tokenizer) if self._tokenizer is not None else None
        drafter.check_vocab(int(self.config.vocab_size), tokenizer_size)
        return drafter, num_draft_tokens

    # ---- text API ---------------------------------------------------------------------------
    def apply_chat_template(self, messages: Messages) -> str:
        """Messages (role/content dicts) → the model's prompt text, ending with the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise CorollaError(f"{self.model_name} has no chat template; use generate_text with a plain prompt")
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return str(text)

    def _encode(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not self._has_bos(prompt)).input_ids
        return ids

    def _has_bos(self, prompt: str) -> bool:
        bos = self.tokenizer.bos_token
        return bool(bos) and prompt.startswith(bos)

    def stream_text(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        session: InferenceSession | None = None,
        sampling: SamplingParams | None = None,
    ) -> TextStream:
        """Generate a continuation of ``prompt`` as an iterator of text pieces (stops applied on the fly).

        With ``session=``, the prompt is the whole conversation so far: the part the servers already
        hold is reused, and only new tokens are sent. ``sampling`` replaces ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``, ``repetition_penalty`` and ``seed``.
        """
        params = sampling_params(sampling, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        ids = self._encode(prompt)
        prefix = None
        if self.ptune is not None:
            if self.ptune.deep is not None:
                raise CorollaError(
                    "a deep_ptune model generates with generate(input_ids, max_new_tokens=...) only: its "
                    "per-block prompts go with every forward, which text streaming's cached sessions cannot carry"
                )
            ids = check_tuned_session(ids, session is not None)
            prefix = self.ptune.input_prompts(ids.shape[0])
        own = session is None
        if session is None:
            pre = 0 if prefix is None else prefix.shape[1]
            session = self.inference_session(pre + ids.shape[1] + max_new_tokens)
        new_ids = session.reuse_prefix(ids)
        loop = self._token_loop(session, new_ids, params, max_new_tokens, self._eos_ids(None), prefix, self.drafter)
        eos = self._eos_ids(None)

        def tokens() -> Generator[int | Rewind, None, FinishReason]:
            reason: FinishReason = "length"
            try:
                while True:
                    item = next(loop)
                    if isinstance(item, Rewind):
                        yield item
                        continue
                    token = int(item[0])
                    if token in eos:  # the loop audits before it ends: it returns, or withdraws the eos too
                        try:
                            yield next(loop)  # a Rewind
                        except StopIteration:
                            return "eos"
                        continue
                    yield token
            except StopIteration as stop:
                reason = stop.value or "length"
            return reason

        def decode(token_ids: list[int]) -> str:
            return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

        return TextStream(
            tokens(),
            decode,
            int(ids.shape[1]),
            stop or (),
            on_close=session.close if own else None,
            unverified=lambda: list(session.unverified.values()),
        )

    def generate_text(self, prompt: str, **kwargs: Any) -> GenerationResult:
        """Generate a whole continuation of ``prompt`` (same options as :meth:`stream_text`)."""
        return self.stream_text(prompt, **kwargs).result()

    def stream_chat(self, messages: Messages, **kwargs: Any) -> TextStream:
        """Like :meth:`stream_text` on the chat-template rendering of ``messages``."""
        return self.stream_text(self.apply_chat_template(messages), **kwargs)

    def chat(self, messages: Messages, **kwargs: Any) -> GenerationResult:
        """Answer a conversation with the model's chat template."""
        return self.stream_chat(messages, **kwargs).result()


__all__ = ["AutoDistributedModelForCausalLM", "DistributedModelForCausalLM", "client_config"]

AutoDistributedModelForCausalLM = DistributedModelForCausalLM


def _leave(checker: ReportChecker, loop: LoopThread, p2p: Any, dht: Any) -> None:
    """Stop reading reports, finish publishing this process's, then leave the swarm (see :func:`release`)."""
    checker.stop()
    finish_publishing(checker.context.config.request_timeout)
    release(loop, p2p, dht)
