"""LlamaIndex adapter against a fake client (no sockets): metadata, chat template, streams, usage."""

from __future__ import annotations

from typing import Any

import pytest
from corolla_fakes import REPLY, FakeModel
from llama_index.core.base.llms.types import ChatMessage, MessageRole

import corolla.integrations._shared as shared
from corolla.integrations.llama_index import DistributedLLM, to_chat_messages

SECRET = "hf_superSecretTokenValue123"


@pytest.fixture
def fake() -> FakeModel:
    return FakeModel()


def test_constructor_does_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("constructor reached the network")

    monkeypatch.setattr(shared, "get_client", refuse)
    llm = DistributedLLM(model_name="acme/fake-model", initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/Qm"], token=SECRET)
    assert llm.model_name == "acme/fake-model"


def test_metadata(fake: FakeModel) -> None:
    llm = DistributedLLM(model_name="acme/fake-model", client=fake, max_tokens=32)
    meta = llm.metadata
    assert meta.context_window == 2048 and meta.num_output == 32
    assert meta.is_chat_model is True and meta.is_function_calling_model is False
    assert meta.model_name == "acme/fake-model"
    assert DistributedLLM(model_name="m", client=fake, context_window=512).metadata.context_window == 512


def test_token_is_secret(fake: FakeModel) -> None:
    llm = DistributedLLM(model_name="acme/fake-model", client=fake, token=SECRET)
    for text in (repr(llm), str(llm), llm.to_json(), llm.model_dump_json(), str(llm.to_dict())):
        assert SECRET not in text
    assert llm.token is not None and llm.token.get_secret_value() == SECRET


def test_complete_and_stream_complete(fake: FakeModel) -> None:
    llm = DistributedLLM(model_name="acme/fake-model", client=fake, max_tokens=4, stop=["capital"])
    response = llm.complete("The capital of France is")
    assert response.text == "Paris is the "
    assert fake.calls[-1][0] == "The capital of France is"
    assert fake.calls[-1][1]["stop"] == ["capital"] and fake.calls[-1][1]["max_new_tokens"] == 4
    assert response.raw is not None and response.raw["finish_reason"] == "stop"
    assert response.raw["usage"]["total_tokens"] == response.raw["usage"]["prompt_tokens"] + 3

    responses = list(llm.stream_complete("x", temperature=0.5))
    assert "".join(r.delta or "" for r in responses) == "Paris is the " and len(responses) > 2
    assert responses[-1].text == "Paris is the "
    sampling = fake.calls[-1][1]["sampling"]
    assert sampling.do_sample is True and sampling.temperature == 0.5
    assert [r.raw is not None for r in responses][-2:] == [False, True], "usage arrives on the last one"


def test_chat_uses_the_chat_template(fake: FakeModel) -> None:
    llm = DistributedLLM(model_name="acme/fake-model", client=fake)
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(role=MessageRole.USER, content="Capital of France?"),
    ]
    response = llm.chat(messages)
    assert response.message.role == MessageRole.ASSISTANT and response.message.content == REPLY
    assert fake.calls[-1][0] == "<|system|>Be brief.\n<|user|>Capital of France?\n<|assistant|>"
    streamed = list(llm.stream_chat(messages))
    assert "".join(r.delta or "" for r in streamed) == REPLY
    assert streamed[-1].message.content == REPLY and streamed[-1].raw is not None


def test_roles_are_mapped_and_merged() -> None:
    messages = [
        ChatMessage(role=MessageRole.DEVELOPER, content="a"),
        ChatMessage(role=MessageRole.SYSTEM, content="b"),
        ChatMessage(role=MessageRole.USER, content="c"),
        ChatMessage(role=MessageRole.CHATBOT, content="d"),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "a\n\nb"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]


async def test_async_forms(fake: FakeModel) -> None:
    llm = DistributedLLM(model_name="acme/fake-model", client=fake, max_tokens=2)
    assert (await llm.acomplete("x")).text == "Paris is"
    assert [r.delta async for r in await llm.astream_complete("x")] == ["Paris", " is"]
    message = ChatMessage(role=MessageRole.USER, content="hi")
    assert (await llm.achat([message])).message.content == "Paris is"
    chunks = [r async for r in await llm.astream_chat([message])]
    assert chunks[-1].message.content == "Paris is" and chunks[-1].raw is not None
