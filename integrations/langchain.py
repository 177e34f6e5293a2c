"""LangChain classes over a Corolla swarm: :class:`DistributedLLM` (text) and :class:`ChatCorolla` (chat).

Both are thin adapters over one shared :class:`corolla.engine.DistributedModelForCausalLM` per
(model, swarm, token): constructing them does no network I/O; the swarm is reached on first use
(or in the constructor with ``connect_on_init=True``). Async methods run the sync ones in an
executor; stop sequences are applied by the engine while streaming.

Example:
    >>> from corolla.integrations.langchain import ChatCorolla
    >>> chat = ChatCorolla(model="meta-llama/Llama-3.1-8B-Instruct", initial_peers=[...])
    >>> chat.invoke("Name three rivers.").content
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Self

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
from langchain_core.language_models.chat_models import generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.utils import secret_from_env
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from corolla.integrations._shared import (
    PROVIDER,
    SETTINGS,
    ClientLike,
    adapter_client,
    engine_kwargs,
    merge_consecutive_roles,
    merge_stops,
    usage_dict,
)

__all__ = ["ChatCorolla", "DistributedLLM"]

logger = logging.getLogger(__name__)


class _CorollaFields(BaseModel):
    """Fields and plumbing shared by :class:`DistributedLLM` and :class:`ChatCorolla`."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str = Field(alias="model")
    """Hub repo id (``"meta-llama/Llama-3.1-8B-Instruct"``) or local folder the swarm serves."""
    initial_peers: list[str] = Field(default_factory=list)
    """Multiaddrs of any swarm peers to join through."""
    token: SecretStr | None = Field(default_factory=secret_from_env("HF_TOKEN", default=None))
    """Hugging Face token for gated models (default: HF_TOKEN, then the saved login); never sent to peers."""
    max_tokens: int | None = None
    """Most tokens to generate (default 256)."""
    temperature: float | None = None
    """Sampling temperature; ``None`` or 0 means greedy decoding."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this."""
    top_k: int | None = None
    """Sample only among the k most likely tokens (``None``/0: all)."""
    repetition_penalty: float | None = None
    """Penalty (> 1) on tokens already in the text (``None``: 1, none)."""
    stop: list[str] | None = None
    """Stop sequences applied to every call (joined with the call's own)."""
    seed: int | None = None
    """Seed for sampling, for reproducible outputs."""
    timeout: float | None = None
    """Seconds a server may take for one step before the client fails over (``ClientConfig.step_timeout``)."""
    max_retries: int | None = None
    """Route re-plans allowed within one call (``ClientConfig.max_retries``)."""
    client_config: dict[str, Any] = Field(default_factory=dict)
    """Other ``corolla.engine.ClientConfig`` fields (e.g. ``{"connect_timeout": 20}``)."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (so callbacks get every token)."""
    connect_on_init: bool = False
    """Check Hub access and connect to the swarm in the constructor instead of on first use."""
    swarm_key: str | None = None
    """Key file of a private swarm (default: ``COROLLA_SWARM_KEY_FILE``, or a public swarm)."""
    client: Any = Field(default=None, exclude=True)
    """An existing ``DistributedModelForCausalLM`` to use instead of the shared one."""

    @model_validator(mode="after")
    def _connect_if_asked(self) -> Self:
        if self.connect_on_init:
            self._get_client()
        return self

    @property
    def lc_secrets(self) -> dict[str, str]:
        """The token is a secret: LangChain serialization writes ``HF_TOKEN`` in its place.

        The classes are not ``is_lc_serializable`` (langchain-core only loads classes from its own
        allowlist), so ``dumps`` writes a ``not_implemented`` stub whose repr masks the token.
        """
        return {"token": "HF_TOKEN"}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "initial_peers": list(self.initial_peers),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "seed": self.seed,
        }

    def _get_client(self, model: str | None = None) -> ClientLike:
        """The client for ``model`` (default: this object's), connecting on first use."""
        return adapter_client(self, model)

    def _ls_params(
        self, model_type: Literal["chat", "llm"], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> LangSmithParams:
        """LangSmith tracing parameters, shared by the chat and the text model."""
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type=model_type,
        )
        settings, stops = self._settings(stop, kwargs)
        if settings["temperature"] is not None:
            params["ls_temperature"] = settings["temperature"]
        if settings["max_tokens"] is not None:
            params["ls_max_tokens"] = settings["max_tokens"]
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def _settings(self, stop: Sequence[str] | None, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
        """The one place where fields and per-call kwargs become generation settings (and stops)."""
        values = {name: kwargs.get(name, getattr(self, name)) for name in SETTINGS}
        ignored = set(kwargs) - set(SETTINGS) - {"model"}
        if ignored:
            logger.debug("Ignoring keyword arguments Corolla does not use: %s", ", ".join(sorted(ignored)))
        return values, merge_stops(self.stop, stop)

    def _engine_kwargs(self, stop: Sequence[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``generate_text``/``stream_text`` for this call."""
        return engine_kwargs(*self._settings(stop, kwargs))

    def _response_metadata(self, model: str, finish_reason: str | None) -> dict[str, Any]:
        return {"model_name": model, "model_provider": PROVIDER, "finish_reason": finish_reason}


def _role(message: BaseMessage) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    if isinstance(message, FunctionMessage):
        return "function"
    if isinstance(message, ChatMessage):
        return message.role
    raise ValueError(f"Cannot turn a {type(message).__name__} into a chat-template message")


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages → role/content dicts for the model's chat template (same roles merged)."""
    return merge_consecutive_roles((_role(m), str(m.text)) for m in messages)


class ChatCorolla(_CorollaFields, BaseChatModel):
    """A LangChain chat model served by a Corolla swarm; messages go through the model's chat template.

    Supports ``invoke``/``batch``/``stream`` and their async forms, stop sequences (applied while
    streaming), callbacks and token usage (``usage_metadata``). Tool calling and structured output
    are not supported.
    """

    @property
    def _llm_type(self) -> str:
        return "corolla-chat"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("chat", stop, kwargs)

    def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> tuple[ClientLike, str, str, dict[str, Any]]:
        model = kwargs.get("model") or self.model_name
        client = self._get_client(model)
        prompt = client.apply_chat_template(to_chat_messages(messages))
        return client, model, prompt, self._engine_kwargs(stop, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
        client, model, prompt, engine_kwargs = self._prepare(messages, stop, kwargs)
        result = client.generate_text(prompt, **engine_kwargs)
        message = AIMessage(
            content=result.text,
            usage_metadata=_usage(result.prompt_tokens, result.completion_tokens),
            response_metadata=self._response_metadata(model, result.finish_reason),
        )
        return ChatResult(
            generations=[ChatGeneration(message=message, generation_info={"finish_reason": result.finish_reason})],
            llm_output={
                "token_usage": usage_dict(result.prompt_tokens, result.completion_tokens),
                "model_name": model,
            },
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        client, model, prompt, engine_kwargs = self._prepare(messages, stop, kwargs)
        stream = client.stream_text(prompt, **engine_kwargs)
        for piece in stream:
            if not piece:
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        # The last chunk carries usage and finish reason, once, as LangChain's aggregation expects.
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=_usage(stream.prompt_tokens, stream.completion_tokens),
                response_metadata=self._response_metadata(model, stream.finish_reason),
                chunk_position="last",
            ),
            generation_info={"finish_reason": stream.finish_reason},
        )


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class DistributedLLM(_CorollaFields, BaseLLM):
    """A LangChain text LLM served by a Corolla swarm: the prompt is sent as is (no chat template).

    Supports ``invoke``/``batch``/``stream`` and their async forms, stop sequences (applied while
    streaming), callbacks and token usage (``llm_output["token_usage"]`` and each generation's
    ``generation_info``).
    """

    max_concurrency: int = 4
    """Prompts of one ``generate``/``batch`` call run at once (each in its own inference session)."""

    @property
    def _llm_type(self) -> str:
        return "corolla"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._ls_params("llm", stop, kwargs)

    def _generate_one(
        self,
        prompt: str,
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        kwargs: dict[str, Any],
    ) -> tuple[Generation, int, int]:
        if self.streaming:
            final: GenerationChunk | None = None
            for chunk in self._stream(prompt, stop=stop, run_manager=run_manager, **kwargs):
                final = chunk if final is None else final + chunk
            info = final.generation_info if final is not None and final.generation_info else {}
            text = final.text if final is not None else ""
            return (
                Generation(text=text, generation_info=info),
                info["prompt_tokens"],
                info["completion_tokens"],
            )
        model = kwargs.get("model") or self.model_name
        result = self._get_client(model).generate_text(prompt, **self._engine_kwargs(stop, kwargs))
        info = {
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
        }
        return (
            Generation(text=result.text, generation_info=info),
            result.prompt_tokens,
            result.completion_tokens,
        )

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        if len(prompts) == 1:
            outcomes = [self._generate_one(prompts[0], stop, run_manager, kwargs)]
        else:
            with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompts)))) as pool:
                outcomes = list(pool.map(lambda p: self._generate_one(p, stop, run_manager, kwargs), prompts))
        prompt_tokens = sum(o[1] for o in outcomes)
        completion_tokens = sum(o[2] for o in outcomes)
        return LLMResult(
            generations=[[o[0]] for o in outcomes],
            llm_output={
                "token_usage": usage_dict(prompt_tokens, completion_tokens),
                "model_name": kwargs.get("model") or self.model_name,
            },
        )

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        model = kwargs.get("model") or self.model_name
        stream = self._get_client(model).stream_text(prompt, **self._engine_kwargs(stop, kwargs))
        for piece in stream:
            if not piece:
                continue
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield GenerationChunk(
            text="",
            generation_info={
                "finish_reason": stream.finish_reason,
                "prompt_tokens": stream.prompt_tokens,
                "completion_tokens": stream.completion_tokens,
                "model_name": model,
            },
        )
