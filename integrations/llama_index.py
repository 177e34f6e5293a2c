"""A LlamaIndex LLM over a Corolla swarm: :class:`DistributedLLM`.

A thin adapter over the shared :class:`corolla.engine.DistributedModelForCausalLM` for its
(model, swarm, token): constructing it does no network I/O; the swarm is reached on first use.
Chats are formatted with the model's own chat template; async methods run the sync ones in an
executor.

Example:
    >>> from llama_index.core import Settings
    >>> from corolla.integrations.llama_index import DistributedLLM
    >>> Settings.llm = DistributedLLM(model_name="meta-llama/Llama-3.1-8B-Instruct", initial_peers=[...])
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, SecretStr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from corolla.integrations._shared import (
    DEFAULT_MAX_NEW_TOKENS,
    PROVIDER,
    SETTINGS,
    ClientLike,
    adapter_client,
    aiter_in_executor,
    engine_kwargs,
    merge_consecutive_roles,
    merge_stops,
    usage_dict,
    with_last,
)

__all__ = ["DistributedLLM"]

logger = logging.getLogger(__name__)

_ROLE_NAMES = {
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.DEVELOPER: "system",
}


def to_chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages → role/content dicts for the model's chat template (same roles merged)."""
    return merge_consecutive_roles((_ROLE_NAMES.get(m.role, m.role.value), m.content or "") for m in messages)


class DistributedLLM(CustomLLM):
    """A LlamaIndex LLM served by a Corolla swarm.

    ``complete`` sends the prompt as is (through ``completion_to_prompt`` when given);
    ``chat`` formats messages with the model's chat template. All have streaming and async forms;
    responses carry token usage in ``raw["usage"]`` (on the last response of a stream).
    """

    model_name: str = Field(description="Hub repo id or local folder the swarm serves.")
    initial_peers: list[str] = Field(default_factory=list, description="Multiaddrs of swarm peers to join.")
    token: SecretStr | None = Field(
        default=None,
        exclude=True,  # never serialized (to_dict/to_json/model_dump)
        description="Hugging Face token for gated models (default: HF_TOKEN, then the saved login).",
    )
    max_tokens: int | None = Field(default=None, description="Most tokens to generate (default 256).")
    temperature: float | None = Field(default=None, description="Sampling temperature; None or 0: greedy.")
    top_p: float | None = Field(default=None, description="Nucleus sampling threshold.")
    top_k: int | None = Field(default=None, description="Sample among the k most likely tokens.")
    repetition_penalty: float | None = Field(default=None, description="Penalty (> 1) on repeated tokens.")
    stop: list[str] | None = Field(default=None, description="Stop sequences applied to every call.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    context_window: int | None = Field(
        default=None, description="Tokens of context (default: the model's max_position_embeddings)."
    )
    timeout: float | None = Field(default=None, description="Seconds a server may take for one step.")
    max_retries: int | None = Field(default=None, description="Route re-plans allowed within one call.")
    client_config: dict[str, Any] = Field(default_factory=dict, description="Other ClientConfig fields.")
    swarm_key: str | None = Field(default=None, description="Key file of a private swarm (default: public).")
    client: Any = Field(default=None, exclude=True, description="An existing DistributedModelForCausalLM.")

    @classmethod
    def class_name(cls) -> str:
        return "CorollaDistributedLLM"

    @property
    def metadata(self) -> LLMMetadata:
        """Context window, output length, model name; ``is_chat_model`` (a chat template is applied)."""
        context_window = self.context_window
        if context_window is None:
            context_window = int(getattr(self._get_client().config, "max_position_embeddings", 2048))
        return LLMMetadata(
            context_window=context_window,
            num_output=self.max_tokens or DEFAULT_MAX_NEW_TOKENS,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.model_name,
        )

    def _get_client(self) -> ClientLike:
        return adapter_client(self)

    def _engine_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The one place where fields and per-call kwargs become generation settings."""
        values = {name: kwargs.get(name, getattr(self, name)) for name in SETTINGS}
        ignored = set(kwargs) - set(SETTINGS) - {"stop"}
        if ignored:
            logger.debug("Ignoring keyword arguments Corolla does not use: %s", ", ".join(sorted(ignored)))
        return engine_kwargs(values, merge_stops(self.stop, kwargs.get("stop")))

    def _raw(self, prompt_tokens: int, completion_tokens: int, finish_reason: str | None) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "provider": PROVIDER,
            "finish_reason": finish_reason,
            "usage": usage_dict(prompt_tokens, completion_tokens),
        }

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        return self._get_client().apply_chat_template(to_chat_messages(messages))

    def _completion_prompt(self, prompt: str, formatted: bool) -> str:
        if not formatted and self.completion_to_prompt is not None:
            return self.completion_to_prompt(prompt)
        return prompt

    # --- sync ----------------------------------------------------------------------------------

    def _complete_text(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponse:
        result = self._get_client().generate_text(prompt, **self._engine_kwargs(kwargs))
        raw = self._raw(result.prompt_tokens, result.completion_tokens, result.finish_reason)
        return CompletionResponse(text=result.text, raw=raw, additional_kwargs=dict(raw["usage"]))

    def _stream_text(self, prompt: str, kwargs: dict[str, Any]) -> CompletionResponseGen:
        stream = self._get_client().stream_text(prompt, **self._engine_kwargs(kwargs))
        text = ""
        for piece, last in with_last(stream):
            text += piece
            if not last:
                yield CompletionResponse(text=text, delta=piece)
            else:
                raw = self._raw(stream.prompt_tokens, stream.completion_tokens, stream.finish_reason)
                yield CompletionResponse(text=text, delta=piece, raw=raw, additional_kwargs=dict(raw["usage"]))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete_text(self._completion_prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_text(self._completion_prompt(prompt, formatted), kwargs)

    def _chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        completion = self._complete_text(self._chat_prompt(messages), kwargs)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=completion.text),
            raw=completion.raw,
            additional_kwargs=completion.additional_kwargs,
        )

    def _stream_chat(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        for completion in self._stream_text(self._chat_prompt(messages), kwargs):
            yield ChatResponse(
                message=ChatMessage(role=MessageRole.ASSISTANT, content=completion.text),
                delta=completion.delta,
                raw=completion.raw,
                additional_kwargs=completion.additional_kwargs,
            )

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, kwargs)

    # --- async: the sync methods in the default executor ----------------------------------------

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        prompt = self._completion_prompt(prompt, formatted)
        return await asyncio.get_running_loop().run_in_executor(None, self._complete_text, prompt, kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        prompt = self._completion_prompt(prompt, formatted)
        return aiter_in_executor(self._stream_text, prompt, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.get_running_loop().run_in_executor(None, self._chat, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return aiter_in_executor(self._stream_chat, messages, kwargs)
