"""The LangChain text LLM and chat model end to end on a live swarm (SmolLM2, greedy decoding)."""

from __future__ import annotations

from typing import Any

import pytest
from corolla_swarm import SwarmModel
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from corolla.integrations.langchain import ChatCorolla, DistributedLLM

pytestmark = [pytest.mark.swarm, pytest.mark.slow]


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


@pytest.fixture
def llm(corolla_swarm: SwarmModel) -> DistributedLLM:
    return DistributedLLM(model=corolla_swarm.model, initial_peers=corolla_swarm.initial_peers, max_tokens=12)


@pytest.fixture
def chat(corolla_swarm: SwarmModel) -> ChatCorolla:
    return ChatCorolla(model=corolla_swarm.model, initial_peers=corolla_swarm.initial_peers, max_tokens=12)


def _stop_inside(text: str) -> str:
    """A stop string the greedy continuation is known to contain, past its first word."""
    words = text.split()
    assert len(words) >= 3, f"expected a few words, got {text!r}"
    return " " + words[2]


def test_text_llm_invoke_usage_and_max_tokens(llm: DistributedLLM) -> None:
    result = llm.generate(["The capital of France is"])
    text = result.generations[0][0].text
    assert text.strip()
    assert result.llm_output is not None
    usage = result.llm_output["token_usage"]
    assert 0 < usage["completion_tokens"] <= 12 and usage["prompt_tokens"] > 0
    info = result.generations[0][0].generation_info
    assert info is not None and info["finish_reason"] in ("length", "eos", "stop")


def test_text_llm_stream_applies_stop_while_streaming(llm: DistributedLLM) -> None:
    prompt = "List the days of the week: Monday, Tuesday,"
    full = llm.invoke(prompt)
    stop = _stop_inside(full)
    recorder = TokenRecorder()
    pieces = list(llm.stream(prompt, stop=[stop], config={"callbacks": [recorder]}))
    assert len([p for p in pieces if p]) >= 2, "text arrives in several pieces"
    assert "".join(pieces) == full[: full.index(stop)]
    assert all(stop.strip() not in p for p in pieces)
    assert "".join(recorder.tokens) == "".join(pieces)


def test_text_llm_batch_and_chain(llm: DistributedLLM) -> None:
    assert all(text.strip() for text in llm.batch(["Water is", "The sun is"]))
    chain = PromptTemplate.from_template("Question: {q}\nAnswer:") | llm | StrOutputParser()
    assert chain.invoke({"q": "What color is the sky?"}).strip()


async def test_text_llm_async(llm: DistributedLLM) -> None:
    text = await llm.ainvoke("The capital of France is")
    streamed = "".join([piece async for piece in llm.astream("The capital of France is")])
    assert text.strip() and streamed == text, "greedy decoding: stream and invoke agree"


def test_chat_answers_and_stops_while_streaming(chat: ChatCorolla) -> None:
    question = "What is the capital of France? Answer in one sentence."
    message = chat.invoke(question)
    text = str(message.content)
    assert "Paris" in text
    stop = _stop_inside(text)
    chunks = list(chat.stream(question, stop=[stop]))
    streamed = "".join(str(c.content) for c in chunks)
    assert streamed == text[: text.index(stop)]
    assert chunks[-1].response_metadata["finish_reason"] == "stop"
    assert chunks[-1].usage_metadata is not None


async def test_chat_lcel_chain_async(chat: ChatCorolla) -> None:
    prompt = ChatPromptTemplate.from_messages([("system", "You are a helpful assistant."), ("human", "{question}")])
    chain = prompt | chat | StrOutputParser()
    answer = await chain.ainvoke({"question": "What is the capital of France?"})
    assert "Paris" in answer
    pieces = [piece async for piece in chain.astream({"question": "What is the capital of France?"})]
    assert "".join(pieces) == answer
