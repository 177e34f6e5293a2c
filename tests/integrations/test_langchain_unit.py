"""LangChain adapters against a fake client (no sockets): mapping, streaming, usage, secrecy."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from corolla_fakes import REPLY, FakeModel
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.load import dumpd, dumps
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_tests.unit_tests import ChatModelUnitTests

import corolla.engine
import corolla.engine.hub
import corolla.integrations._shared as shared
from corolla.engine import SamplingParams
from corolla.integrations._shared import DEFAULT_MAX_NEW_TOKENS, close_clients
from corolla.integrations.langchain import ChatCorolla, DistributedLLM, to_chat_messages

SECRET = "hf_superSecretTokenValue123"
PEERS = ["/ip4/127.0.0.1/tcp/31337/p2p/QmFakePeer"]


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def fake() -> FakeModel:
    return FakeModel()


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


class TestChatCorollaStandardUnit(ChatModelUnitTests):
    """LangChain's standard unit suite: constructing needs no swarm, so no client is injected."""

    @property
    def chat_model_class(self) -> type[ChatCorolla]:
        return ChatCorolla

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": "acme/fake-model", "initial_peers": PEERS}

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        return {"HF_TOKEN": SECRET}, {"model": "acme/fake-model", "initial_peers": PEERS}, {"token": SECRET}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return False


def test_import_is_lazy() -> None:
    """`corolla.integrations` imports neither langchain nor llama_index."""
    code = (
        "import sys, corolla.integrations\n"
        "bad = [m for m in sys.modules if m.startswith(('langchain', 'llama_index'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_constructors_do_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("constructor reached the network")

    monkeypatch.setattr(shared, "get_client", refuse)
    ChatCorolla(model="acme/fake-model", initial_peers=PEERS, token=SECRET)
    DistributedLLM(model="acme/fake-model", initial_peers=PEERS, token=SECRET)


def test_connect_on_init_is_opt_in(monkeypatch: pytest.MonkeyPatch, fake: FakeModel) -> None:
    seen: list[tuple[str, list[str], Any]] = []

    def connect(model: str, initial_peers: list[str], token: Any, **overrides: Any) -> FakeModel:
        seen.append((model, initial_peers, token))
        return fake

    monkeypatch.setattr(corolla.engine.hub, "check_model_access", lambda model, token: None)
    monkeypatch.setattr(corolla.engine.DistributedModelForCausalLM, "from_pretrained", connect)
    try:
        chat = ChatCorolla(model="acme/fake-model", initial_peers=PEERS, connect_on_init=True, timeout=5)
        assert len(seen) == 1 and seen[0][:2] == ("acme/fake-model", PEERS)
        chat.invoke("hi")
        assert len(seen) == 1, "the client is reused after the first connection"
    finally:
        close_clients()


def test_token_is_secret_everywhere(fake: FakeModel) -> None:
    for model in (
        ChatCorolla(model="acme/fake-model", initial_peers=PEERS, token=SECRET, client=fake),
        DistributedLLM(model="acme/fake-model", initial_peers=PEERS, token=SECRET, client=fake),
    ):
        assert model.token is not None and model.token.get_secret_value() == SECRET
        texts = [
            repr(model),
            str(model),
            dumps(model),
            json.dumps(dumpd(model)),
            json.dumps(model._identifying_params),
            model.model_dump_json(),
            str(model._get_ls_params()),
        ]
        for text in texts:
            assert SECRET not in text
        model.invoke("hi")
        assert all(SECRET not in json.dumps(kwargs, default=str) for _, kwargs in fake.calls)


def test_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)
    chat = ChatCorolla(model="acme/fake-model")
    assert chat.token is not None and chat.token.get_secret_value() == SECRET
    assert SECRET not in repr(chat)


def test_invoke_chat_template_usage_and_metadata(fake: FakeModel) -> None:
    chat = ChatCorolla(model="acme/fake-model", client=fake, max_tokens=50)
    message = chat.invoke([SystemMessage("Be brief."), HumanMessage("Capital of France?")])
    assert isinstance(message, AIMessage)
    assert message.content == REPLY
    prompt, kwargs = fake.calls[-1]
    assert prompt == "<|system|>Be brief.\n<|user|>Capital of France?\n<|assistant|>"
    assert kwargs["max_new_tokens"] == 50 and kwargs["sampling"].do_sample is False
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == len(REPLY.split())
    assert message.usage_metadata["total_tokens"] == (
        message.usage_metadata["input_tokens"] + message.usage_metadata["output_tokens"]
    )
    assert message.response_metadata["model_name"] == "acme/fake-model"
    assert message.response_metadata["finish_reason"] == "eos"


def test_parameter_mapping(fake: FakeModel) -> None:
    chat = ChatCorolla(
        model="acme/fake-model",
        client=fake,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.2,
        seed=3,
    )
    chat.invoke("hi")
    kwargs = fake.calls[-1][1]
    assert kwargs == {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "stop": None,
        "sampling": SamplingParams(
            do_sample=True, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=3
        ),
    }
    chat.invoke("hi", temperature=0, max_tokens=3)  # per-call overrides
    kwargs = fake.calls[-1][1]
    assert kwargs["sampling"].do_sample is False and kwargs["max_new_tokens"] == 3
    chat.bind(top_k=5).invoke("hi")
    assert fake.calls[-1][1]["sampling"].top_k == 5


def test_consecutive_roles_are_merged() -> None:
    messages = [SystemMessage("a"), SystemMessage("b"), HumanMessage("c"), AIMessage("d"), HumanMessage("e")]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "a\n\nb"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e"},
    ]


def test_stream_with_stop_callbacks_and_usage(fake: FakeModel) -> None:
    recorder = TokenRecorder()
    chat = ChatCorolla(model="acme/fake-model", client=fake, stop=["Seine"])
    chunks = list(chat.stream("hi", stop=["It sits"], config={"callbacks": [recorder]}))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    text = "".join(str(c.content) for c in chunks)
    assert text == "Paris is the capital of France. "
    assert fake.calls[-1][1]["stop"] == ["Seine", "It sits"]
    assert [t for t in recorder.tokens if t] == [str(c.content) for c in chunks if c.content]
    assert len(recorder.tokens) > 3, "tokens arrive one by one"
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert last.usage_metadata is not None and last.usage_metadata["output_tokens"] > 0
    assert [c for c in chunks if c.usage_metadata] == [last]
    assert last.response_metadata["finish_reason"] == "stop"


def test_streaming_flag_streams_inside_invoke(fake: FakeModel) -> None:
    recorder = TokenRecorder()
    chat = ChatCorolla(model="acme/fake-model", client=fake, streaming=True)
    message = chat.invoke("hi", config={"callbacks": [recorder]})
    assert message.content == REPLY
    assert "".join(recorder.tokens) == REPLY
    assert message.usage_metadata is not None


async def test_async_forms(fake: FakeModel) -> None:
    chat = ChatCorolla(model="acme/fake-model", client=fake, max_tokens=4)
    message = await chat.ainvoke("hi")
    assert message.content == "Paris is the capital"
    chunks = [chunk async for chunk in chat.astream("hi")]
    assert "".join(str(c.content) for c in chunks) == "Paris is the capital"
    assert len(chunks) == 5 and chunks[-1].chunk_position == "last"
    results = await chat.abatch(["a", "b"])
    assert [r.content for r in results] == ["Paris is the capital"] * 2


def test_lcel_chain(fake: FakeModel) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in one line."), ("human", "{question}")])
    chain = prompt | ChatCorolla(model="acme/fake-model", client=fake) | StrOutputParser()
    assert chain.invoke({"question": "Capital of France?"}) == REPLY
    assert "<|user|>Capital of France?" in fake.calls[-1][0]
    assert "".join(chain.stream({"question": "again"})) == REPLY


def test_text_llm_invoke_batch_stream(fake: FakeModel) -> None:
    llm = DistributedLLM(model="acme/fake-model", client=fake, max_tokens=4)
    assert llm.invoke("The capital of France is") == "Paris is the capital"
    assert fake.calls[-1][0] == "The capital of France is", "a text LLM sends the prompt as is"
    assert llm.batch(["a", "b", "c"]) == ["Paris is the capital"] * 3
    assert "".join(llm.stream("x", stop=[" the"])) == "Paris is"
    result = llm.generate(["a", "b"])
    assert result.llm_output is not None
    usage = result.llm_output["token_usage"]
    assert usage["completion_tokens"] == 8 and usage["total_tokens"] == usage["prompt_tokens"] + 8
    info = result.generations[0][0].generation_info
    assert info is not None and info["finish_reason"] == "length"


def test_text_llm_callbacks_and_streaming_flag(fake: FakeModel) -> None:
    recorder = TokenRecorder()
    llm = DistributedLLM(model="acme/fake-model", client=fake, streaming=True)
    result = llm.generate(["hi"], callbacks=[recorder])
    assert result.generations[0][0].text == REPLY
    assert "".join(recorder.tokens) == REPLY
    assert result.llm_output is not None and result.llm_output["token_usage"]["completion_tokens"] > 0


async def test_text_llm_async(fake: FakeModel) -> None:
    llm = DistributedLLM(model="acme/fake-model", client=fake, max_tokens=2)
    assert await llm.ainvoke("x") == "Paris is"
    assert [p async for p in llm.astream("x")] == ["Paris", " is", ""]
    assert await llm.abatch(["x", "y"]) == ["Paris is", "Paris is"]


def test_text_llm_in_chain_and_identifying_params(fake: FakeModel) -> None:
    llm = DistributedLLM(model="acme/fake-model", client=fake, temperature=0.5, token=SECRET)
    chain = PromptTemplate.from_template("Q: {q}\nA:") | llm | StrOutputParser()
    assert chain.invoke({"q": "capital?"}) == REPLY
    params = llm._identifying_params
    assert params["model_name"] == "acme/fake-model" and params["temperature"] == 0.5
    assert "token" not in params
    ls = llm._get_ls_params(model="other/model")
    assert ls["ls_provider"] == "corolla" and ls["ls_model_name"] == "other/model"
