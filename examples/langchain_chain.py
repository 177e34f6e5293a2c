"""A LangChain chain (prompt | model | parser) whose model runs on a Corolla swarm.

    pip install -c constraints.txt -e ".[examples]"
    python examples/langchain_chain.py --initial-peers /ip4/.../p2p/... [--model NAME] [--question ...]

For a gated model (e.g. a Llama), pass --token, set HF_TOKEN or run `hf auth login` first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from corolla.engine.errors import missing_extra

try:
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate

    from corolla.integrations.langchain import ChatCorolla, DistributedLLM
except ModuleNotFoundError as e:  # one line saying what to install, not a traceback
    sys.exit(missing_extra("examples/langchain_chain.py", "examples", e.name))

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("COROLLA_MODEL", DEFAULT_MODEL))
    parser.add_argument("--initial-peers", nargs="+", default=os.environ.get("COROLLA_INITIAL_PEERS", "").split() or [])
    parser.add_argument("--question", default="Why is the sky blue?")
    parser.add_argument("--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    chat = ChatCorolla(
        model=args.model,
        initial_peers=args.initial_peers,
        token=args.token,
        max_tokens=args.max_tokens,
        temperature=0.7,
        top_p=0.9,
        stop=["\n\n\n"],
    )
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a concise assistant. Answer in two sentences."), ("human", "{question}")]
    )
    chain = prompt | chat | StrOutputParser()

    # Tokens arrive as the swarm generates them; the last chunk says why the answer ended. The "A:" label
    # waits for the first token, so what happens before it (joining the swarm, loading) stays off its line.
    print(f"Q: {args.question}", flush=True)
    label, finish_reason = "A: ", None
    for chunk in (prompt | chat).stream({"question": args.question}):
        if chunk.content:
            print(f"{label}{chunk.content}", end="", flush=True)
            label = ""
        finish_reason = chunk.response_metadata.get("finish_reason", finish_reason)
    print(label + (f"…\n[cut at {args.max_tokens} tokens: --max-tokens]" if finish_reason == "length" else ""))

    # The same chain, async and batched; usage comes back on the message.
    async def ask_many() -> None:
        answers = await chain.abatch([{"question": "Name a prime number."}, {"question": "Name a color."}])
        for answer in answers:
            print("-", answer.strip())

    asyncio.run(ask_many())
    message = (prompt | chat).invoke({"question": "Say hello."})
    print("usage:", message.usage_metadata)

    # A plain text LLM: the prompt is sent as is, without the chat template.
    llm = DistributedLLM(model=args.model, initial_peers=args.initial_peers, token=args.token, max_tokens=24)
    print("completion:", llm.invoke("The three primary colors are", stop=["."]))


if __name__ == "__main__":
    main()
