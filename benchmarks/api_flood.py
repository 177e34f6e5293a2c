"""``corolla api`` under floods: seconds to an answer and the server's RSS growth for 1/5/50 MB chat bodies
(declared with Content-Length, and chunked), and a normal request's latency alone and under 200 concurrent
ones. The API runs in this process with a fake swarm client (a piece every 10 ms); prints figures only.

    python benchmarks/api_flood.py [--concurrent 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import _common  # noqa: F401  (thread environment, tests/support on the path)
import httpx
import psutil
from api_fakes import FakeModel, serving

MB = 10**6


def post_body(port: int, size: int, chunked: bool) -> tuple[str, float]:
    """POST a ``size``-byte chat body (a long user message) while reading the answer; (status line, seconds)."""
    head = b'{"model":"fake","messages":[{"role":"user","content":"'
    tail = b'"}]}'
    filler = size - len(head) - len(tail)
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    began = time.monotonic()
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()
    )

    def write() -> None:
        piece = 64 * 1024
        parts = [head] + [b"a" * min(piece, filler - i) for i in range(0, filler, piece)] + [tail]
        try:
            for part in parts:
                sock.sendall(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # answered and closed before the end

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    answer = b""
    with sock:
        while b"\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    took = time.monotonic() - began
    writer.join(timeout=60)
    return answer.split(b"\r\n", 1)[0].decode(errors="replace"), took


async def normal_latency(url: str, concurrent: int) -> tuple[float, int, dict[int, int]]:
    """A normal request's seconds and status while ``concurrent`` others are in flight; their statuses counted."""
    body = {"model": "fake", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 16}
    limits = httpx.Limits(max_connections=concurrent + 10, max_keepalive_connections=concurrent + 10)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        crowd = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(concurrent)]
        await asyncio.sleep(0.5 if concurrent else 0)
        began = time.monotonic()
        normal = await client.post("/v1/chat/completions", json=body)
        took = time.monotonic() - began
        statuses: dict[int, int] = {}
        for answer in await asyncio.gather(*crowd):
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
    return took, normal.status_code, statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=200)
    args = parser.parse_args()
    model = FakeModel(context=8192, delay=0.01)
    with serving(model) as url:
        port = int(url.rsplit(":", 1)[1])
        me = psutil.Process()
        for chunked in (False, True):
            for size in (1 * MB, 5 * MB, 50 * MB):
                before = me.memory_info().rss
                status, took = post_body(port, size, chunked)
                grown = (me.memory_info().rss - before) / 2**20
                how = "chunked" if chunked else "content-length"
                print(f"{size // MB:3d} MB body ({how:14}): {status!r} after {took:.3f} s, RSS +{grown:.0f} MiB")
        alone, status, _ = asyncio.run(normal_latency(url, 0))
        print(f"normal request alone: {alone:.2f} s ({status})")
        crowded, status, statuses = asyncio.run(normal_latency(url, args.concurrent))
        print(
            f"normal request under {args.concurrent} concurrent: {crowded:.2f} s ({status}), "
            f"x{crowded / alone:.1f}; the others: {json.dumps(statuses)}"
        )


if __name__ == "__main__":
    main()
