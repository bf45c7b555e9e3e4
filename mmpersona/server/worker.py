"""The model worker: one thread runs every job that touches a model, one at a time, from a bounded queue.

One job at a time keeps the models' memory and their (not thread-safe) state under one owner; the bound turns
overload into a quick "busy, retry after N seconds" instead of a growing wait. A job is a plain function; a
streaming job pushes pieces as it makes them, and the request reads them from an asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Iterator

logger = logging.getLogger(__name__)
_DONE = object()


class QueueFull(Exception):
    """The worker's queue is full; `retry_after` is a fair guess, in seconds, of when a slot frees up."""

    def __init__(self, retry_after: int, size: int):
        super().__init__(f"the model worker is busy ({size} request(s) waiting); retry after {retry_after} s")
        self.retry_after, self.size = retry_after, size


class ModelWorker:
    """Runs submitted jobs in one thread; at most `queue_size` wait behind the running one."""

    def __init__(self, queue_size: int = 8, name: str = "mmpersona-model-worker"):
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.queue_size = queue_size
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self._mean_seconds = 1.0  # a running mean of job durations, for Retry-After
        self.busy = False
        self.done = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_seconds * (self.waiting + 1)))

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Queue `fn`; its result (or exception) arrives in the returned future. Raises `QueueFull`."""
        future: Future = Future()
        try:
            self._jobs.put_nowait((fn, future))
        except queue.Full:
            raise QueueFull(self.retry_after(), self.queue_size) from None
        return future

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Submit `fn` and await its result."""
        return await asyncio.wrap_future(self.submit(fn))

    async def stream(self, start: Callable[[], tuple[Any, Iterator[str]]]) -> tuple[Any, AsyncIterator[str]]:
        """A streaming job: `start()` runs in the worker and returns (head, pieces); the pieces are iterated in
        the worker too. Awaits `start` (so its errors reach the caller before any response is sent), then returns
        (head, an async iterator of the pieces); an error while iterating is raised from the iterator."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        ready: Future = Future()

        def job() -> None:
            try:
                head, it = start()
            except BaseException as e:
                ready.set_exception(e)
                return
            ready.set_result(head)
            try:
                for piece in it:
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)
                loop.call_soon_threadsafe(pieces.put_nowait, _DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the request
                loop.call_soon_threadsafe(pieces.put_nowait, e)

        self.submit(job)
        head = await asyncio.wrap_future(ready)

        async def read() -> AsyncIterator[str]:
            while True:
                item = await pieces.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        return head, read()

    def _run(self) -> None:
        while True:
            fn, future = self._jobs.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            self.busy = True
            t = time.perf_counter()
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)
            finally:
                self.busy = False
                self.done += 1
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - t)

    def close(self) -> None:
        """Let queued jobs finish, then stop the thread."""
        self._jobs.put((None, None))
        self._thread.join(timeout=60)
