"""Stream handlers that check each message's size from its frame header before reading its body.

On a hivemind stream every protobuf message is one frame: a marker byte (``0`` message, ``1`` error or end of
stream), an 8-byte big-endian body length, then the body. hivemind's own stream handlers read whatever length
the header declares, so one peer could make a server buffer a gigabyte before anything refuses it. Here the
server reads the frames itself: a header that declares more than ``max_message_bytes`` gets a clear error
answer and the stream is closed without its body being buffered (the bytes still arriving are read in small
pieces and dropped for a bounded time, so the peer can finish writing and read the answer).

The number of streams open at once is capped per client peer, per address group (``routing/groups.py``:
the group of the address the p2p daemon saw the stream's connection come from) and in total, and each stream keeps at most one
decoded message waiting for its handler, so the memory that peers' requests take is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from corolla.engine.errors import CacheFullError, CorollaError, ProtocolError
from corolla.engine.routing.peer_groups import connection_group

logger = logging.getLogger(__name__)

MESSAGE_MARKER = b"\x00"  # hivemind's P2P.MESSAGE_MARKER
ERROR_MARKER = b"\x01"  # hivemind's P2P.ERROR_MARKER (an empty one is the end of the request stream)
HEADER_BYTES = 8  # big-endian body length
DRAIN_CHUNK = 64 * 1024  # bytes read at once while dropping the rest of a refused stream


@dataclass(frozen=True)
class StreamContext(P2PContext):
    """A stream's context with the address group of the connection it came over ("" if unknown)."""

    group: str = ""


StreamHandler = Callable[
    [AsyncIterator[runtime_pb2.ExpertRequest], StreamContext], AsyncIterator[runtime_pb2.ExpertResponse]
]
ErrorAnswer = Callable[[Exception], runtime_pb2.ExpertResponse]


@dataclass(frozen=True)
class FrameLimits:
    """What one stream may send and how many streams may be open at once."""

    max_message_bytes: int  # bytes of one message body
    max_streams_per_peer: int  # streams one client peer may have open at once
    max_streams: int  # streams all peers may have open at once
    max_streams_per_group: int | None = None  # streams all peers of one address group may have open (None: no cap)
    drain_seconds: float = 5.0  # seconds to keep reading (and dropping) a refused stream's bytes before closing
    drain_bytes: int = 64 * 1024 * 1024  # bytes to read and drop at most before closing a refused stream


def check_frame_length(length: int, max_bytes: int) -> None:
    """Refuse a frame whose header declares more than ``max_bytes`` (before any of its body is read)."""
    if length > max_bytes:
        raise ProtocolError(
            f"message of {length} bytes exceeds this server's limit of {max_bytes} bytes; "
            "send hidden states in smaller chunks (ClientConfig.max_chunk_bytes)"
        )


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> runtime_pb2.ExpertRequest | None:
    """The next request of a stream, or None at its end. Raises ProtocolError for oversized or bad frames."""
    try:
        marker = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        return None  # the peer hung up between messages
    if marker not in (MESSAGE_MARKER, ERROR_MARKER):
        raise ProtocolError(f"unknown frame marker {marker!r}")
    length = int.from_bytes(await reader.readexactly(HEADER_BYTES), "big")
    check_frame_length(length, max_bytes)
    body = await reader.readexactly(length)
    if marker == ERROR_MARKER:
        return None  # hivemind ends a request stream with an (empty) error frame
    request = runtime_pb2.ExpertRequest()
    try:
        request.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError and others on garbage
        raise ProtocolError(f"message is not an ExpertRequest: {e}") from e
    return request


async def write_frame(writer: asyncio.StreamWriter, response: runtime_pb2.ExpertResponse) -> None:
    """Send one response frame (the same framing hivemind's clients read)."""
    body = response.SerializeToString()
    writer.write(MESSAGE_MARKER + len(body).to_bytes(HEADER_BYTES, "big"))
    writer.write(body)
    await writer.drain()


async def drain_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: FrameLimits) -> None:
    """Drop what the peer still sends (bounded in time and bytes, never buffered whole), then close."""
    dropped = 0

    async def drop() -> None:
        nonlocal dropped
        while dropped < limits.drain_bytes:
            chunk = await reader.read(DRAIN_CHUNK)
            if not chunk:
                return
            dropped += len(chunk)

    with contextlib.suppress(Exception):
        await asyncio.wait_for(drop(), limits.drain_seconds)
    writer.close()


@dataclass
class StreamCounter:
    """Open streams per peer and in total (used from the event loop only)."""

    limits: FrameLimits
    by_peer: dict[str, int] = field(default_factory=dict)
    by_group: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Streams open now."""
        return sum(self.by_peer.values())

    def open(self, peer: str, group: str = "") -> None:
        """Count a new stream of ``peer`` (of address ``group``) or raise CacheFullError if a cap is reached."""
        mine = self.by_peer.get(peer, 0)
        if mine >= self.limits.max_streams_per_peer:
            raise CacheFullError(
                f"you have {mine} streams open on this server, its limit per peer; "
                "close sessions you no longer use or wait for running requests to finish"
            )
        ours = self.by_group.get(group, 0)
        cap = self.limits.max_streams_per_group
        if group and cap is not None and ours >= cap:
            raise CacheFullError(
                f"peers of your address group {group} have {ours} streams open on this server, its limit per "
                "group; close sessions you no longer use or wait for running requests to finish"
            )
        if self.total >= self.limits.max_streams:
            raise CacheFullError(f"this server has {self.total} streams open, its limit; retry later or elsewhere")
        self.by_peer[peer] = mine + 1
        if group:
            self.by_group[group] = ours + 1

    def close(self, peer: str, group: str = "") -> None:
        """Forget one stream of ``peer`` (of ``group``, as opened)."""
        for table, key in ((self.by_peer, peer), (self.by_group, group)):
            left = table.get(key, 0) - 1
            if left > 0:
                table[key] = left
            else:
                table.pop(key, None)


class BoundedStreams:
    """Registers Corolla's stream RPCs on a P2P daemon with its own size-checked frame reader."""

    def __init__(self, limits: FrameLimits, error_answer: ErrorAnswer) -> None:
        self.limits = limits
        self.error_answer = error_answer
        self.streams = StreamCounter(limits)

    async def register(self, p2p: P2P, name: str, handler: StreamHandler) -> None:
        """Serve ``handler`` (requests in, responses out) as the stream RPC ``name``."""

        async def on_stream(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            group = connection_group(str(info.addr), str(info.peer_id))
            context = StreamContext(handle_name=name, local_id=p2p.peer_id, remote_id=info.peer_id, group=group)
            await self.serve(context, reader, writer, handler)

        await p2p.add_binary_stream_handler(name, on_stream)

    async def serve(
        self,
        context: StreamContext,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: StreamHandler,
    ) -> None:
        """Run one stream: read frames into a one-message queue, send the handler's answers back."""
        peer, group = str(context.remote_id), context.group
        try:
            self.streams.open(peer, group)
        except CorollaError as e:
            logger.info("refused a stream from %s: %s", peer[-6:], e)
            with contextlib.suppress(Exception):
                await write_frame(writer, self.error_answer(e))
            await drain_and_close(reader, writer, self.limits)
            return
        queue: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue(maxsize=1)

        async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            while (request := await queue.get()) is not None:
                yield request

        async def answer() -> None:
            async for response in handler(requests(), context):
                await write_frame(writer, response)

        answering = asyncio.create_task(answer())
        reading: asyncio.Future[runtime_pb2.ExpertRequest | None] | None = None
        refused: Exception | None = None
        ended = False  # the peer ended its request stream (nothing more to drop before closing)
        stopping = False  # this task is cancelled (server shutdown): close at once
        try:
            while not answering.done():
                reading = asyncio.ensure_future(read_frame(reader, self.limits.max_message_bytes))
                await asyncio.wait({answering, reading}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    break
                try:
                    request = reading.result()
                except ProtocolError as e:
                    refused = e
                    break
                except (asyncio.IncompleteReadError, ConnectionError):
                    request = None  # the peer hung up mid-frame
                ended = request is None
                # Waits while the handler still holds the previous message: one message per stream at a time.
                put = asyncio.ensure_future(queue.put(request))
                await asyncio.wait({answering, put}, return_when=asyncio.FIRST_COMPLETED)
                if not put.done():
                    put.cancel()
                    break
                if request is None:
                    await asyncio.wait({answering})
                    break
        except asyncio.CancelledError:
            stopping = True
            raise
        except Exception as e:  # a broken connection: this stream only
            logger.debug("stream from %s broke: %s", peer[-6:], e)
        finally:
            if reading is not None and not reading.done():
                reading.cancel()
            if not answering.done():
                answering.cancel()
            if not stopping:
                await asyncio.wait({answering})  # never swallows a cancellation of this task
                if not answering.cancelled() and (failure := answering.exception()) is not None:
                    # Retrieved here, so a peer that hangs up mid-answer is a debug line, not asyncio's
                    # "Task exception was never retrieved" at garbage collection.
                    logger.debug("answering %s stopped: %r", peer[-6:], failure)
            if stopping:
                writer.close()
            elif refused is not None:
                logger.info("refused a message from %s: %s", peer[-6:], refused)
                with contextlib.suppress(Exception):
                    await write_frame(writer, self.error_answer(refused))
                await drain_and_close(reader, writer, self.limits)
            elif ended:
                writer.close()
            else:  # the handler answered early (an error) while the peer may still be writing
                await drain_and_close(reader, writer, self.limits)
            self.streams.close(peer, group)
