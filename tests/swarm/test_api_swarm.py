"""``corolla api`` against a live loopback swarm, driven by clients nobody here wrote: the official
``openai`` SDK (sync, async, streaming, errors), LangChain's ``ChatOpenAI`` and ``curl -N``.

The swarm serves a tiny random llama (a 4096-token context) on two servers whose cache budgets hold
2000 tokens each, so a request for 3000 tokens finds no cache room (429) while 16 short concurrent
streams fit. Greedy answers through the API must equal Corolla's own client's answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from prometheus_client.parser import text_string_to_metric_families
from swarm_helpers import client, peer_id, running_swarm
from web_helpers import WebProcess, wait_for

from corolla.engine import DistributedModelForCausalLM
from corolla.engine.apps.local_swarm import Swarm
from corolla.engine.client.remote import remote_info

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(600)]

KEY = "sk-corolla-test"
CONTEXT = 4096
CACHE_TOKENS = 2000  # per server: 3 blocks x 2 (k, v) x 2 kv heads x 16 dims x 4 bytes = 768 bytes a token
MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 8


class ApiSwarm:
    """The live swarm, Corolla's own client of it (for references and server info) and the API."""

    def __init__(self, path: Path, swarm: Swarm, ref: DistributedModelForCausalLM, api: WebProcess) -> None:
        self.path = path
        self.model_id = path.name  # what /v1/models lists: the folder's name, as a person types it
        self.swarm = swarm
        self.ref = ref
        self.api = api
        self.base_url = api.url + "/v1"
        self.expected = ref.chat(MESSAGES, max_new_tokens=MAX_TOKENS)

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", KEY)
        return openai.OpenAI(base_url=self.base_url, max_retries=0, timeout=300, **kwargs)

    def sessions(self) -> list[int]:
        """Open sessions on each server, from the servers' own info."""
        return [
            int(self.ref.loop.run(remote_info(self.ref.p2p, peer_id(s), 10.0))["sessions"])
            for s in self.swarm.servers
            if s.alive()
        ]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample at ``/metrics``: (name, sorted labels) → value."""
        text = httpx.get(self.api.url + "/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiSwarm]:
    path = tiny_checkpoint("llama", max_position_embeddings=CONTEXT)
    cache = ["--cache-bytes", str(CACHE_TOKENS * 768)]
    with running_swarm(path, ["0:3", "3:6"], tmp_path_factory, extra_args=cache) as swarm:
        logs = tmp_path_factory.mktemp("api")
        api = WebProcess(
            ["api", str(path), "--initial-peers", *swarm.initial_peers, "--api-key", KEY], logs / "api.log"
        )
        try:
            api.wait_ready()
            with client(path, swarm) as ref:
                yield ApiSwarm(path, swarm, ref, api)
        finally:
            api.stop()


def test_models_and_health(live: ApiSwarm) -> None:
    models = live.openai().models.list()
    assert [m.id for m in models.data] == [live.model_id] and "/" not in live.model_id
    health = httpx.get(live.api.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == live.model_id
    assert f"serving {live.model_id} at {live.base_url}" in live.api.log_path.read_text()  # logged once listening


def test_the_model_path_still_names_the_model(live: ApiSwarm) -> None:
    reply = live.openai().chat.completions.create(
        model=str(live.path), messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.choices[0].message.content == live.expected.text and reply.model == live.model_id


def test_a_body_that_is_not_json_is_a_400_saying_so(live: ApiSwarm) -> None:
    answer = httpx.post(
        live.base_url + "/chat/completions",
        content=b'{"model": "m", "messages": [}',
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] is None and error["code"] == "invalid_json"
    assert error["message"].startswith("The request body is not valid JSON: Expecting value at character 28")


def test_openai_sdk_sync_chat_and_text_completion(live: ApiSwarm) -> None:
    sdk = live.openai()
    reply = sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == live.expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("length" if live.expected.finish_reason == "length" else "stop")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        live.expected.prompt_tokens,
        live.expected.completion_tokens,
    )
    expected = live.ref.generate_text("Once upon", max_new_tokens=6)
    text = sdk.completions.create(model=live.model_id, prompt="Once upon", max_tokens=6, temperature=0)
    assert text.choices[0].text == expected.text
    assert text.usage is not None and text.usage.completion_tokens == expected.completion_tokens
    # max_completion_tokens is the newer name of max_tokens; seeded sampling repeats itself.
    short = sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_completion_tokens=2, temperature=0)
    assert short.usage is not None and short.usage.completion_tokens <= 2
    sampled = [
        sdk.chat.completions.create(
            model=live.model_id, messages=MESSAGES, max_tokens=6, temperature=0.9, top_p=0.8, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_openai_sdk_streaming_with_usage_and_stop(live: ApiSwarm) -> None:
    sdk = live.openai()
    chunks = list(
        sdk.chat.completions.create(
            model=live.model_id,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == live.expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(reasons) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == live.expected.completion_tokens
    # A stop string cuts the text before it and ends the stream with finish_reason "stop".
    full = live.ref.generate_text("Once upon", max_new_tokens=12).text
    assert len(full) >= 4, full
    stop = full[2:4]
    streamed = sdk.completions.create(
        model=live.model_id, prompt="Once upon", max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == full[: full.find(stop)]
    assert pieces[-1].choices[0].finish_reason == "stop"


async def test_openai_sdk_async(live: ApiSwarm) -> None:
    sdk = openai.AsyncOpenAI(base_url=live.base_url, api_key=KEY, max_retries=0, timeout=300)
    replies = await asyncio.gather(
        *(
            sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
            for _ in range(3)
        )
    )
    assert [r.choices[0].message.content for r in replies] == [live.expected.text] * 3
    stream = await sdk.chat.completions.create(
        model=live.model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == live.expected.text
    await sdk.close()


def test_openai_sdk_errors(live: ApiSwarm) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        live.openai(api_key="sk-wrong").models.list()
    assert wrong_key.value.status_code == 401 and wrong_key.value.code == "invalid_api_key"
    sdk = live.openai()
    ask = dict(model=live.model_id, messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as n:
        sdk.chat.completions.create(**ask, n=2)  # type: ignore[call-overload]
    assert n.value.status_code == 400 and n.value.param == "n"
    with pytest.raises(openai.BadRequestError) as penalty:
        sdk.chat.completions.create(**ask, presence_penalty=0.5)  # type: ignore[call-overload]
    assert penalty.value.param == "presence_penalty" and "repetition_penalty" in penalty.value.message
    with pytest.raises(openai.BadRequestError) as hot:
        sdk.chat.completions.create(**ask, temperature=5)  # type: ignore[call-overload]
    assert hot.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_tokens=CONTEXT)
    assert long.value.code == "context_length_exceeded" and str(CONTEXT) in long.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert unknown.value.code == "model_not_found" and live.model_id in unknown.value.message
    # More tokens than any server's cache budget: the swarm has no room, a 429 clients retry later.
    with pytest.raises(openai.RateLimitError) as full:
        sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_tokens=3000, stream=True)
    assert full.value.status_code == 429 and "cache" in full.value.message
    bad_json = httpx.post(
        live.base_url + "/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert bad_json.status_code == 400 and set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    # The swarm still serves after every refusal.
    reply = sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == live.expected.text


def test_langchain_chat_openai(live: ApiSwarm) -> None:
    llm = ChatOpenAI(
        model=live.model_id,
        base_url=live.base_url,
        api_key=KEY,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[call-arg]
        max_retries=0,
    )
    pairs = [(m["role"], m["content"]) for m in MESSAGES]
    answer = llm.invoke(pairs)
    assert answer.content == live.expected.text
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["output_tokens"] == live.expected.completion_tokens
    streamed = "".join(str(chunk.content) for chunk in llm.stream(pairs))
    assert streamed == live.expected.text


def test_curl_streams_server_sent_events(live: ApiSwarm) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test (apt-get install curl)"
    body = {"model": live.model_id, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    out = subprocess.run(
        [
            curl,
            "-sSN",
            "--fail-with-body",
            live.base_url + "/chat/completions",
            "-H",
            f"Authorization: Bearer {KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    events = [line for line in out.splitlines() if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == live.expected.text


async def test_16_concurrent_streams_all_complete(live: ApiSwarm) -> None:
    sdk = openai.AsyncOpenAI(base_url=live.base_url, api_key=KEY, max_retries=0, timeout=500)

    async def one() -> tuple[str, str | None]:
        stream = await sdk.chat.completions.create(
            model=live.model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    results = await asyncio.gather(*(one() for _ in range(16)))
    await sdk.close()
    assert [text for text, _ in results] == [live.expected.text] * 16
    assert all(reason in ("stop", "length") for _, reason in results)
    assert wait_for(lambda: live.sessions() == [0, 0], 30, "every session closed")


def test_disconnect_mid_stream_frees_the_servers_cache(live: ApiSwarm) -> None:
    before = live.metrics().get(("corolla_api_client_disconnects_total", ()), 0.0)
    body = {"model": live.model_id, "messages": MESSAGES, "max_tokens": 1500, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(timeout=300) as http,
        http.stream("POST", live.base_url + "/chat/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events >= 4:
                break
        # Each server holds the stream's session while it runs (waited for: on a loaded machine a step past the
        # stall bound moves the session to a fresh one on the same server, which takes a moment).
        wait_for(lambda: live.sessions() == [1, 1], 30, "each server holds the stream's session")
    # The connection is gone: the API closes the session and both servers free its cache at once
    # (their idle timeout is 10 minutes, so this is the API's doing).
    wait_for(lambda: live.sessions() == [0, 0], 30, "the servers freed the session")
    wait_for(
        lambda: live.metrics().get(("corolla_api_client_disconnects_total", ()), 0.0) == before + 1,
        30,
        "the API counted the disconnect",
    )


def test_metrics_count_requests_tokens_latency_and_errors(live: ApiSwarm) -> None:
    before = live.metrics()
    sdk = live.openai()
    reply = sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, n=3)
    after = live.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    endpoint = "/v1/chat/completions"
    assert delta("corolla_api_requests_total", endpoint=endpoint, status="200") == 1
    assert delta("corolla_api_requests_total", endpoint=endpoint, status="400") == 1
    assert delta("corolla_api_errors_total", code="invalid_request_error") == 1
    assert reply.usage is not None
    assert delta("corolla_api_tokens_total", kind="completion") == reply.usage.completion_tokens
    assert delta("corolla_api_tokens_total", kind="prompt") == reply.usage.prompt_tokens
    assert delta("corolla_api_request_seconds_count", endpoint=endpoint) == 1  # generations only
    assert after[("corolla_api_requests_in_progress", ())] == 0


def test_a_hung_server_gives_504(live: ApiSwarm, tmp_path: Path) -> None:
    """A second API whose client waits 3 s per step: a paused (SIGSTOP) server is a timeout."""
    env = {"COROLLA_STEP_TIMEOUT": "3", "COROLLA_CONNECT_TIMEOUT": "3", "COROLLA_MAX_RETRIES": "0"}
    strict = WebProcess(
        ["api", str(live.path), "--initial-peers", *live.swarm.initial_peers], tmp_path / "api.log", env=env
    )
    paused = live.swarm.servers[1]
    try:
        strict.wait_ready()
        os.kill(paused.pid, signal.SIGSTOP)
        sdk = openai.OpenAI(base_url=strict.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with pytest.raises(openai.InternalServerError) as timeout:
            sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_tokens=4)
        assert timeout.value.status_code == 504 and timeout.value.code == "swarm_timeout"
    finally:
        os.kill(paused.pid, signal.SIGCONT)
        strict.stop()


def test_missing_blocks_give_503_naming_them(live: ApiSwarm) -> None:
    """Last in this module: it stops the only server of blocks 3:6."""
    live.swarm.servers[1].stop()
    sdk = live.openai()
    with pytest.raises(openai.InternalServerError) as missing:
        sdk.chat.completions.create(model=live.model_id, messages=MESSAGES, max_tokens=4)
    assert missing.value.status_code == 503 and missing.value.code == "missing_blocks"
    assert "3:6" in missing.value.message
    assert httpx.get(live.api.url + "/health", timeout=10).status_code == 200  # the API itself stays up
