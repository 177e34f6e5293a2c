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

from corolla.engine.client.credentials import credentials_for
from corolla.engine.client.inputs import check_ids, check_unsupported, reuse_prefix, to_wire
from corolla.engine.client.joining import join_swarm, load_tokenizer, release
from corolla.engine.client.loop import LoopThread
from corolla.engine.client.ptune import PromptTuning
from corolla.engine.client.remote import remote_forward
from corolla.engine.client.sampling import SamplingParams, next_tokens
from corolla.engine.client.session import InferenceSession
from corolla.engine.client.text import FinishReason, GenerationResult, TextStream
from corolla.engine.client.training import (
    check_tuned_generate,
    check_tuned_session,
    greedy_generate,
    make_prompt_tuning,
    takes_training_path,
    training_forward,
)
from corolla.engine.config import ClientConfig, as_tuple, from_env
from corolla.engine.errors import CorollaError, PeerUnavailableError
from corolla.engine.models.checkpoint import Checkpoint, ClientHead, load_client_head
from corolla.engine.routing.sequence_manager import SequenceManager

logger = logging.getLogger(__name__)

Messages = Sequence[dict[str, str]]


class DistributedModelForCausalLM(nn.Module):
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
        client_config: ClientConfig,
        dht: Any,
        loop: LoopThread,
        p2p: Any,
        manager: SequenceManager,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.config = config
        self._tokenizer = tokenizer
        self.head = head  # a registered submodule: .to(), .parameters() and state_dict() reach it
        self.ptune: PromptTuning | None = None  # trainable soft prompts (see enable_prompt_tuning)
        self.client_config = client_config
        self.dht = dht
        self.loop = loop
        self.p2p = p2p
        self.manager = manager
        self._active = threading.local()  # per thread: the sessions entered with `with`, innermost last
        # Runs on close() or, if the user never closes, at interpreter exit (before hivemind's own
        # finalizers would complain about a missing event loop).
        self._finalizer = weakref.finalize(self, release, loop, p2p, dht)

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
        """
        from corolla.engine.hub import check_model_access, resolve_token

        if swarm_key is not None:
            client_config_overrides["swarm_key_file"] = os.fspath(swarm_key)
        config = client_config(initial_peers, config, **client_config_overrides)
        if not config.initial_peers:
            raise CorollaError(
                "no initial peers: pass initial_peers=[...] (multiaddrs printed by `corolla server --new-swarm`) "
                "or set COROLLA_INITIAL_PEERS"
            )
        token = resolve_token(token)
        ckpt = Checkpoint(model_name_or_path, token=token, revision=revision)
        if not ckpt.is_local:
            check_model_access(model_name_or_path, token)
        hf_config = ckpt.config()
        tokenizer = load_tokenizer(ckpt, model_name_or_path, token, revision)
        head = load_client_head(ckpt, hf_config, torch.float32)
        head.requires_grad_(False)  # the client trains prompts (or what the user unfreezes), never by default
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        model_name = config.dht_prefix or ckpt.default_dht_prefix
        dht, loop, p2p, manager = join_swarm(config, model_name, int(hf_config.num_hidden_layers), model_name_or_path)
        model = cls(model_name, hf_config, tokenizer, head, config, dht, loop, p2p, manager)
        if tuning_mode is not None:
            model.enable_prompt_tuning(tuning_mode, pre_seq_len)
        return model

    def enable_prompt_tuning(self, tuning_mode: str, pre_seq_len: int = 16) -> PromptTuning:
        """Add trainable prompts: ``ptune`` (before the input) or ``deep_ptune`` (also one set per block).

        The input prompts start as the embeddings of ``pre_seq_len`` random vocabulary tokens; deep prompts
        start at zero. ``model.ptune.save(path)`` / ``.load(path)`` keep trained prompts.
        """
        self.ptune = make_prompt_tuning(self, tuning_mode, pre_seq_len)
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
        cfg = self.client_config
        if active_adapter is not None:
            cfg = dataclasses.replace(cfg, active_adapter=active_adapter)
        return _ModelSession(self._active, self.manager, self.p2p, self.loop, cfg, max_length)

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
        if takes_training_path(self, labels):
            return training_forward(self, input_ids, labels)
        with torch.no_grad():
            return self._plain_forward(input_ids)

    def _plain_forward(self, input_ids: torch.Tensor) -> CausalLMOutputWithPast:
        """The inference forward: stateless, chunked by the servers, no gradients."""
        hidden = to_wire(self.head.embed(input_ids.to(self.device)), self.client_config.wire_dtype)
        cfg = self.client_config
        for attempt in range(cfg.max_retries + 1):
            route = self.manager.plan_forward()
            x = hidden
            try:
                for hop in route:
                    x = self.loop.run(
                        remote_forward(
                            self.p2p,
                            hop.peer_id,
                            hop.start,
                            hop.end,
                            x,
                            cfg.max_chunk_bytes,
                            cfg.request_timeout,
                            proof=credentials_for(cfg).proof(self.p2p.peer_id.to_base58(), hop.peer_id),
                            adapter=cfg.active_adapter,
                        )
                    )
                    self.manager.mark_ok(hop.peer_id)  # it answered well: forget its past failures
                logits = self.head.logits(x.to(self.device))
                return CausalLMOutputWithPast(logits=logits.to(input_ids.device))
            except PeerUnavailableError as e:
                if attempt == cfg.max_retries:
                    raise
                self.manager.ban(hop.peer_id, str(e))  # the peer we talked to, whatever the error says
        raise AssertionError("unreachable")

    # ---- token generation -------------------------------------------------------------------
    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        if eos_token_id is None:
            eos_token_id = getattr(self.config, "eos_token_id", None)
            if eos_token_id is None and self._tokenizer is not None:
                eos_token_id = self._tokenizer.eos_token_id
        if eos_token_id is None:
            return set()
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}

    @torch.inference_mode()
    def _token_loop(
        self,
        session: InferenceSession,
        new_ids: torch.Tensor,
        params: SamplingParams,
        max_new_tokens: int,
        eos_ids: set[int],
        prefix: torch.Tensor | None = None,
    ) -> Generator[torch.Tensor, None, FinishReason]:
        """Feed ``new_ids`` [batch, n] (CPU), then yield one sampled token per row per step ([batch], CPU).

        ``prefix`` ([batch, pre, hidden], e.g. trained soft prompts) goes to the servers before the first
        fed token, in the same step.

        Embeddings, logits and sampling run on the model's device; hidden states go to the servers from
        CPU memory; the session's token bookkeeping stays on the CPU.
        """
        device = self.device
        generator = torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None
        feed = new_ids if session.pending_ids is None else torch.cat([session.pending_ids, new_ids], dim=1)
        session.pending_ids = None
        seen = feed if session.token_ids is None else torch.cat([session.token_ids, feed], dim=1)
        finished = torch.zeros(feed.shape[0], dtype=torch.bool)
        pad_id = self._tokenizer.pad_token_id if self._tokenizer is not None else None
        pad = pad_id if pad_id is not None else next(iter(eos_ids), 0)
        for _ in range(max_new_tokens):
            if feed.shape[1] == 0:
                raise ValueError("nothing to generate from: give at least one input token")
            embeds = self.head.embed(feed.to(device))
            if prefix is not None:
                embeds = torch.cat([prefix.detach().to(embeds.device, embeds.dtype), embeds], dim=1)
                prefix = None
            hidden = session.step(to_wire(embeds, self.client_config.wire_dtype))
            session.token_ids, session.pending_ids = seen, None
            logits = self.head.logits(hidden[:, -1:].to(device))[:, -1]
            token = next_tokens(logits, seen.to(device), params, generator).cpu()
            token = torch.where(finished, torch.full_like(token, pad), token)
            finished |= torch.tensor([int(t) in eos_ids for t in token])
            session.pending_ids = token[:, None]  # sampled, not yet in the servers' caches
            yield token
            if bool(finished.all()):
                return "eos"
            feed = token[:, None]
            seen = torch.cat([seen, feed], dim=1)
        return "length"

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
        **unused: Any,
    ) -> torch.Tensor:
        """transformers-style generation: returns ``input_ids`` followed by the new tokens.

        With ``session=``, ``input_ids`` are only the *new* tokens of this turn: earlier turns are
        already in the servers' caches (Petals' multi-turn convention), and ``None`` continues from the
        last generated token. ``streamer`` is any object with transformers' streamer interface
        (``put(ids)``, ``end()``), e.g. ``transformers.TextStreamer``. The result is on the device of
        ``input_ids`` (on the model's device when continuing with ``None``).
        """
        if input_ids is None:
            input_ids = unused.pop("inputs", None)  # transformers' name of the first argument
        prefix = None
        if self.ptune is not None:
            in_session = session is not None or self.active_session is not None
            if self.ptune.deep is not None:  # deep prompts go with every forward: no cached sessions
                input_ids = check_tuned_generate(input_ids, do_sample, in_session)
                check_ids(input_ids, attention_mask)
                return greedy_generate(self, input_ids, max_new_tokens)
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
        out_device = input_ids.device
        input_ids = input_ids.cpu()
        params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        own = session is None
        if session is None:
            pre = 0 if prefix is None else prefix.shape[1]
            session = self.inference_session(pre + (max_length or input_ids.shape[1] + max_new_tokens))
        tokens: list[torch.Tensor] = []
        eos_ids = self._eos_ids(eos_token_id)
        try:
            if streamer is not None:
                streamer.put(input_ids)
            for token in self._token_loop(session, input_ids, params, max_new_tokens, eos_ids, prefix):
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
    ) -> TextStream:
        """Generate a continuation of ``prompt`` as an iterator of text pieces (stops applied on the fly).

        With ``session=``, the prompt is the whole conversation so far: the part the servers already
        hold is reused, and only new tokens are sent.
        """
        params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
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
        new_ids = reuse_prefix(session, ids)
        loop = self._token_loop(session, new_ids, params, max_new_tokens, self._eos_ids(None), prefix)
        eos = self._eos_ids(None)

        def tokens() -> Generator[int, None, FinishReason]:
            reason: FinishReason = "length"
            try:
                while True:
                    token = int(next(loop)[0])
                    if token in eos:
                        return "eos"
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


class _ModelSession(InferenceSession):
    """An inference session that is its model's active session in the thread that entered it."""

    def __init__(self, active: threading.local, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active = active

    def __enter__(self) -> _ModelSession:
        if not hasattr(self._active, "stack"):
            self._active.stack = []
        self._active.stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        stack: list[InferenceSession] = getattr(self._active, "stack", [])
        if self in stack:
            stack.remove(self)
        super().__exit__(*exc)


def client_config(
    initial_peers: Sequence[str] | str | None = None, config: ClientConfig | None = None, **overrides: Any
) -> ClientConfig:
    """The settings :meth:`DistributedModelForCausalLM.from_pretrained` runs with.

    ``config`` (or the defaults, then ``COROLLA_*`` environment variables) with ``overrides`` applied.
    Given peers win over ``config`` and over ``COROLLA_INITIAL_PEERS``; with none given (None or
    empty), the environment variable or ``config`` supplies them.
    """
    config = from_env(ClientConfig, **overrides) if config is None else dataclasses.replace(config, **overrides)
    peers = as_tuple(initial_peers)
    return dataclasses.replace(config, initial_peers=peers) if peers else config


AutoDistributedModelForCausalLM = DistributedModelForCausalLM
