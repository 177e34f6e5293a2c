"""The LlamaIndex LLM on a live swarm: a VectorStoreIndex query engine answers from its documents."""

from __future__ import annotations

import pytest
from corolla_swarm import SwarmModel
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from minilm_embedding import MiniLMEmbedding

from corolla.integrations.llama_index import DistributedLLM

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

DOCUMENTS = [
    "The Corolla project's mascot is a purple otter named Pim. Pim appears on every Corolla sticker.",
    "Volunteers run Corolla servers at home; each server hosts a span of transformer blocks.",
    "The lighthouse of Brightwater was painted green in 1921 and is 42 meters tall.",
    "Sourdough bread needs flour, water, salt and a starter; it rises for about twelve hours.",
]


@pytest.fixture
def llm(corolla_swarm: SwarmModel) -> DistributedLLM:
    return DistributedLLM(model_name=corolla_swarm.model, initial_peers=corolla_swarm.initial_peers, max_tokens=24)


def test_metadata_from_the_model(llm: DistributedLLM) -> None:
    meta = llm.metadata
    assert meta.context_window == 8192  # SmolLM2's max_position_embeddings
    assert meta.is_chat_model and meta.num_output == 24


def test_query_engine_answers_from_documents(llm: DistributedLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCUMENTS], embed_model=MiniLMEmbedding())
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    response = engine.query("What is the name of the Corolla project's mascot?")
    assert "Pim" in str(response)
    assert any("mascot" in node.node.get_content() for node in response.source_nodes)


async def test_stream_chat_async(llm: DistributedLLM) -> None:
    messages = [ChatMessage(role=MessageRole.USER, content="What is the capital of France?")]
    whole = (await llm.achat(messages)).message.content or ""
    responses = [r async for r in await llm.astream_chat(messages)]
    assert "".join(r.delta or "" for r in responses) == whole
    assert "Paris" in whole
    assert responses[-1].raw is not None and responses[-1].raw["usage"]["completion_tokens"] > 0
