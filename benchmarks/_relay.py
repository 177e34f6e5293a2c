"""A userspace TCP relay that delays every chunk by a fixed time in each direction, keeping its order.

This kernel has no netem; putting one of these in front of each server (and having the server announce the
relay's port instead of its own) adds the same one-way delay to every link that reaches that server.

    python benchmarks/_relay.py --delay-ms 25 LISTEN_PORT:TARGET_PORT [...]

Prints ``ready`` once every listener is up; SIGUSR1 turns the delay off and SIGUSR2 back on (for chunks read
from then on); on SIGTERM prints the bytes relayed per listener as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time

relayed: dict[int, int] = {}
delaying = [True]  # SIGUSR1 clears it, SIGUSR2 sets it


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, port: int) -> None:
    """Copy ``reader`` to ``writer``; each chunk is written ``delay`` seconds after it was read (in order)."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        while chunk := await reader.read(65536):
            await queue.put((time.monotonic() + (delay if delaying[0] else 0.0), chunk))
        await queue.put((time.monotonic() + delay, b""))

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                break
            writer.write(chunk)
            relayed[port] = relayed.get(port, 0) + len(chunk)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen: int, target: int, delay: float) -> asyncio.Server:
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # cancelled when the relay stops
            await asyncio.gather(pipe(reader, up_writer, delay, listen), pipe(up_reader, writer, delay, listen))

    return await asyncio.start_server(on_client, "127.0.0.1", listen)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay added to every chunk")
    parser.add_argument("pairs", nargs="+", help="LISTEN_PORT:TARGET_PORT")
    args = parser.parse_args()
    servers = []
    for pair in args.pairs:
        listen, target = (int(p) for p in pair.split(":"))
        servers.append(await serve(listen, target, args.delay_ms / 1000))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: delaying.__setitem__(0, False))
    loop.add_signal_handler(signal.SIGUSR2, lambda: delaying.__setitem__(0, True))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await stop.wait()
    for server in servers:
        server.close()
    sys.stdout.write(json.dumps(relayed) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
