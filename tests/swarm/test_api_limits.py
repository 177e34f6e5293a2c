"""``corolla api`` bounded, over real HTTP to a real uvicorn server (the swarm client is a fake: no swarm here).

A body over the limit gets a 413 before it is read (declared or chunked), a prompt that cannot fit the
context gets a 400 without being tokenized, and generations beyond the running ones wait in a bounded,
first-come-first-served queue, with 429 + Retry-After beyond it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import psutil
import pytest
from api_fakes import FakeModel, serving

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
LIMIT = 1 * MiB
JSON = {"content-type": "application/json"}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _raw_post(url: str, headers: str, body_chunks: int, chunk: bytes, chunked: bool) -> tuple[bytes, float]:
    """POST /v1/chat/completions over a raw socket, writing the body in a thread while reading the answer.

    Returns the status line and headers the server answered, and the seconds until they came.
    """
    sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=10)
    began = time.monotonic()
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())

    def write() -> None:
        try:
            for _ in range(body_chunks):
                sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: the rest is never read

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        took = time.monotonic() - began
    finally:
        sock.close()
        writer.join(timeout=10)
    return answer, took


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_50_mb_body_gets_413_at_once_and_is_not_held(chunked: bool) -> None:
    model = FakeModel()
    with serving(model, max_body_bytes=LIMIT) as url:
        rss = psutil.Process().memory_info().rss
        size, piece = 50 * MiB, b"a" * (64 * 1024)
        headers = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n"
        answer, took = _raw_post(
            url, headers + "Content-Type: application/json\r\n", size // len(piece), piece, chunked
        )
        grown = psutil.Process().memory_info().rss - rss
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert took < 1.0, f"413 after {took:.2f} s"
        assert grown < 50 * MiB, f"the server grew by {grown / MiB:.0f} MiB"
        # the error is OpenAI's shape and says the limit and what to do
        refused = httpx.post(url + "/v1/chat/completions", content=b"x" * (LIMIT + 1), timeout=10)
        error = refused.json()["error"]
        assert refused.status_code == 413 and error["code"] == "request_too_large"
        assert "1MiB" in error["message"] and "--max-body-bytes" in error["message"]
        assert not model.tokenized


def test_a_chunked_body_is_cut_at_the_limit_and_smaller_ones_pass() -> None:
    model = FakeModel(context=1_000_000)  # room for a prompt of half a MiB
    with serving(model, max_body_bytes=LIMIT) as url:

        def body(n: int) -> bytes:  # a valid chat request of about n bytes
            return b'{"model":"fake","max_tokens":1,"messages":[{"role":"user","content":"' + b"a" * n + b'"}]}'

        def chunks(data: bytes) -> object:
            for i in range(0, len(data), 100_000):
                yield data[i : i + 100_000]

        ok = httpx.post(url + "/v1/chat/completions", content=chunks(body(LIMIT // 2)), headers=JSON, timeout=30)
        assert ok.status_code == 200, ok.text
        cut = httpx.post(url + "/v1/chat/completions", content=chunks(body(LIMIT)), headers=JSON, timeout=30)
        assert cut.status_code == 413


def test_a_huge_prompt_under_the_body_limit_is_refused_without_tokenizing_it() -> None:
    model = FakeModel(context=256)  # at most 256 x 16 characters can fit
    with serving(model, max_body_bytes=8 * MiB) as url:
        began = time.monotonic()
        answer = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "fake", "messages": [{"role": "user", "content": "word " * 1_000_000}]},
            timeout=30,
        )
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded"
        assert answer.json()["error"]["param"] == "messages"
        assert time.monotonic() - began < 5
        text = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "a" * 5000}, timeout=30)
        assert text.status_code == 400 and text.json()["error"]["param"] == "prompt"
        assert model.tokenized == []  # the tokenizer never saw them
        fits = httpx.post(url + "/v1/completions", json={"model": "fake", "prompt": "a" * 100}, timeout=30)
        assert fits.status_code == 200 and model.tokenized == [100]


async def test_generations_queue_in_order_then_get_429() -> None:
    model = FakeModel(delay=0.1)  # 5 pieces: a generation holds its slot about 0.5 s
    with serving(model, max_sessions=1, max_queue=3) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            finished: list[int] = []

            async def ask(i: int) -> httpx.Response:
                answer = await client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 5})
                finished.append(i)
                return answer

            first = []
            for i in range(4):  # one runs, three wait; sent apart so that they arrive in this order
                first.append(asyncio.create_task(ask(i)))
                await asyncio.sleep(0.03)
            await asyncio.sleep(0.1)
            refused = await asyncio.gather(*(ask(10 + i) for i in range(4)))  # the queue is full
            assert [r.status_code for r in refused] == [429] * 4
            assert int(refused[0].headers["Retry-After"]) >= 1
            assert refused[0].json()["error"]["code"] == "server_busy"
            answers = await asyncio.gather(*first)
            assert [r.status_code for r in answers] == [200] * 4
            assert finished[-4:] == [0, 1, 2, 3]  # first come, first served

            # a normal request behind a full queue completes after the queue ahead of it, not later
            ahead = [asyncio.create_task(ask(20 + i)) for i in range(3)]
            await asyncio.sleep(0.1)
            began = time.monotonic()
            normal = await ask(99)
            took = time.monotonic() - began
            await asyncio.gather(*ahead)
            assert normal.status_code == 200
            assert took < 4 * 0.5 + 1.5, f"waited {took:.2f} s behind 3 requests of 0.5 s"
