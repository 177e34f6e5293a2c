"""A background asyncio loop for the synchronous client API (hivemind's P2P is asyncio-based)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


class LoopThread:
    """An event loop running forever in a daemon thread; ``run`` submits coroutines from any thread."""

    def __init__(self, name: str = "corolla-client-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (``timeout`` in seconds)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("LoopThread.run called from its own loop; await the coroutine instead")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def submit(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` on the loop without waiting for it (from any thread, the loop's own included); what it
        raises is logged at debug level. For best-effort work whose caller has nothing to wait for; dropped if
        the loop was stopped."""
        if not self.loop.is_running() or self.loop.is_closed():
            coro.close()  # never started: no "coroutine was never awaited" warning
            return
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        future.add_done_callback(_log_failure)

    def stop(self) -> None:
        """Cancel what still runs on the loop (streams of an interrupted step), then stop the loop and its thread.

        Tasks left pending would be destroyed later with "Task was destroyed but it is pending!" and
        "Event loop is closed" tracebacks on stderr (seen on Ctrl-C in the middle of an answer).
        """
        if self.loop.is_running():
            if threading.current_thread() is not self._thread:
                with contextlib.suppress(Exception):
                    self.run(_cancel_other_tasks(), timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def _log_failure(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.debug("background work on the client loop failed: %s", future.exception())


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
