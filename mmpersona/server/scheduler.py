"""How the server shares its resources among requests, besides the model worker (`worker.ModelWorker`, the lane of
local model jobs):

- `RemoteLane`: requests to a remote VLM server (vLLM, SGLang, TGI: engines that batch many requests) go out
  from the event loop, up to `concurrency` at once; they never wait behind local model jobs.
- `PixelBudget`: decoded photos are large (an 8192x8192 photo is 200 MB as RGB, from a 130 KB PNG); a request
  holds its photo's pixels from before decoding until its response ends, and waits while the budget is spent.
- `Watch`: notices a client that disconnects, and sets the request's `stop` event: a queued job is then dropped
  and a running one stops at its next token or denoising step.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from .worker import QueueFull


class RemoteLane:
    """At most `concurrency` requests to the remote VLM at once; at most `waiting` more wait for a slot."""

    def __init__(self, concurrency: int, waiting: int):
        self.concurrency, self.max_waiting = concurrency, waiting
        self.in_flight = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(concurrency)

    def admit(self) -> None:
        """Raise `QueueFull` when a new request would have to wait and `waiting` already do."""
        if self.in_flight + self.waiting >= self.concurrency and self.waiting >= self.max_waiting:
            raise QueueFull(1, self.max_waiting, f"the VLM server has {self.in_flight} request(s) in flight and "
                                                 f"{self.waiting} waiting; retry after 1 s")

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.admit()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()


class PixelBudget:
    """Pixels of decoded photos the server holds at once: `acquire(n)` waits until `n` fit (a photo larger than
    the whole budget waits until it is alone) and returns the `Hold` to release."""

    def __init__(self, pixels: int):
        self.capacity = pixels
        self.used = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, pixels: int) -> "Hold":
        pixels = max(0, min(pixels, self.capacity))
        while self.used + pixels > self.capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += pixels
        return Hold(self, pixels)

    def _release(self, pixels: int) -> None:
        self.used -= pixels
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:  # each checks again whether it fits
            if not waiter.done():
                waiter.set_result(None)


class Hold:
    """Pixels held in a `PixelBudget`; `release()` gives them back (once, however often it is called)."""

    def __init__(self, budget: PixelBudget, pixels: int):
        self.budget, self.pixels = budget, pixels

    def release(self) -> None:
        if self.budget is not None:
            budget, self.budget = self.budget, None
            budget._release(self.pixels)


class Watch:
    """The request's `stop` event, set when its client disconnects (or once its response has been sent); and
    callbacks to run then. It always ends: the server reports the end of every request, sent or abandoned.

    Use as `async with Watch(request) as watch:` around the route's work; a streamed response hands its own end
    over with `watch.keep()`, and the watch then ends with the connection.
    """

    def __init__(self, request: Any):
        self.request = request
        self.stop = threading.Event()
        self._task: asyncio.Task | None = None
        self._kept = False
        self._on_end: list[Callable[[], Any]] = []

    async def _listen(self) -> None:
        try:
            while (await self.request.receive())["type"] != "http.disconnect":
                pass
        finally:
            self.stop.set()
            for fn in self._on_end:
                fn()

    def on_end(self, fn: Callable[[], Any]) -> None:
        self._on_end.append(fn)

    def keep(self) -> None:
        """The response goes on after the route returns (a stream): the watch lives until the connection ends."""
        self._kept = True

    async def until_gone(self, awaitable: Any) -> Any:
        """`awaitable`'s result; cancelled (raising `Cancelled`) if the client disconnects first."""
        from ..cancel import Cancelled

        work = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({work, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            work.cancel()
            raise Cancelled()
        return work.result()

    async def __aenter__(self) -> "Watch":
        self._task = asyncio.ensure_future(self._listen())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if not self._kept:
            self._task.cancel()
