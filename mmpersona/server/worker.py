"""The model worker: one thread runs every job that computes with a local model, from a bounded, fair queue.

One thread keeps the models' memory and their (not thread-safe) state under one owner, and torch's threads
from oversubscribing the cores. The queue is bounded twice: in all (`queue_size`) and per user (`per_user`), so
overload is a quick "busy, retry after N seconds" and one user filling the queue is refused while the others
are still served. Waiting jobs are served fairly: next is the user whose last job started longest ago (a user
with nothing running goes first), in arrival order among equals. A job whose `stop` event is set before it
starts is dropped; a running job checks `stop` between its steps itself (`mmpersona.cancel`).

A job is a plain function; a streaming job pushes pieces as it makes them, and the request reads them from an
asyncio queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Iterator

from ..cancel import Cancelled

logger = logging.getLogger(__name__)
_DONE = object()


class QueueFull(Exception):
    """A queue is full; `retry_after` is a fair guess, in seconds, of when a slot frees up."""

    def __init__(self, retry_after: int, size: int, message: str | None = None):
        super().__init__(message or f"the model worker is busy ({size} request(s) waiting); retry after "
                                    f"{retry_after} s")
        self.retry_after, self.size = retry_after, size


#: How long a batch may wait, at most, for requests that are on their way to it (being received or decoded).
ARRIVAL_WAIT = 0.05


class Arrival:
    """A batchable request on its way to the queue (`ModelWorker.arriving`): a batch about to start waits for
    it a little. Ends when it is queued, or with `done()` when it is not (idempotent)."""

    def __init__(self, worker: "ModelWorker"):
        self.worker, self.pending = worker, True

    def done(self) -> None:
        with self.worker._cond:
            self._end()
            self.worker._cond.notify_all()

    def _end(self) -> None:  # under the worker's lock
        if self.pending:
            self.pending = False
            self.worker._arriving -= 1


async def awaited(future: Future, stop: threading.Event | None, *, job: Future | None = None) -> Any:
    """`future`'s result, awaited; cancelling the awaiting task sets `stop` and cancels the job (`job`, else
    `future` itself), so that it is dropped before it starts or stops at its next step."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        (job or future).cancel()
        raise


class _Job:
    __slots__ = ("fn", "future", "stop", "key", "item", "yields", "restarts", "user", "started")

    def __init__(self, fn: Callable[..., Any], future: Future, stop: threading.Event | None, key: Any = None,
                 item: Any = None, yields: bool = False, user: str = ""):
        self.fn, self.future, self.stop, self.key, self.item = fn, future, stop, key, item
        self.yields = yields  # background work that gives way to requests (`submit_idle`)
        self.restarts = 0  # a job that gives way: how many more times it may start again
        self.user = user
        self.started = False  # a background job that gave way has started before (its future is running)


class ModelWorker:
    """Runs submitted jobs in one thread; at most `queue_size` wait behind the running one, `per_user` of them
    from one user."""

    def __init__(self, queue_size: int = 32, name: str = "mmpersona-model-worker", *, per_user: int | None = None,
                 max_batch: int = 8, batch_window: float = 0.0):
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if per_user is not None and per_user < 1:
            raise ValueError(f"per_user must be at least 1, got {per_user}")
        if max_batch < 1 or batch_window < 0:
            raise ValueError(f"max_batch must be at least 1 and batch_window at least 0, got {max_batch}, "
                             f"{batch_window}")
        self.queue_size = queue_size
        self.per_user = per_user or queue_size
        self.max_batch, self.batch_window = max_batch, batch_window
        self._arriving = 0  # batchable requests on their way (`Arrival`)
        self.batches = 0  # batched runs of more than one job
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()  # users with waiting jobs, by first arrival
        self._started: dict[str, int] = {}  # when each waiting user's last job started (a tick)
        self._ticks = itertools.count()
        self._waiting = 0
        self._idle: deque[tuple[str, _Job]] = deque()  # `submit_idle`: run only when no other job waits
        self._running: _Job | None = None  # the background job running now, if it gives way (`submit_idle`)
        self._closed = False
        self._mean_seconds = 1.0  # a running mean of job durations, for Retry-After
        self.busy = False
        self.done = 0  # jobs run
        self.dropped = 0  # jobs dropped before they started: their caller was gone
        self.stopped = 0  # jobs stopped while running (they raised `Cancelled`)
        self.yielded = 0  # background jobs stopped to give way to a request, to start again later
        self.seconds = 0.0  # time spent running jobs
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def quiet(self) -> bool:
        """Nothing runs or waits, background work included."""
        with self._cond:
            return not self.busy and not self._queues and not self._idle

    def retry_after(self, waiting: int | None = None) -> int:
        return max(1, math.ceil(self._mean_seconds * ((self._waiting if waiting is None else waiting) + 1)))

    def submit(self, fn: Callable[[], Any], *, user: str = "", stop: threading.Event | None = None) -> Future:
        """Queue `fn` for `user`; its result (or exception) arrives in the returned future. Raises `QueueFull`.
        A job whose `stop` is set before it starts is dropped (its future raises `Cancelled`)."""
        return self._queue(_Job(fn, Future(), stop), user)

    #: `submit_idle` jobs one user may have waiting
    IDLE_PER_USER = 2

    #: how many times a background job that gives way (`submit_idle(yields=True)`) is started again
    IDLE_RETRIES = 3

    def submit_idle(self, fn: Callable[..., Any], *, user: str = "", yields: bool = False) -> Future:
        """Queue `fn` at the lowest priority: it starts only when no other job waits (work no response waits for,
        such as reading a chat turn for memory). Bounded apart from the queue, so it never takes a request's place:
        at most `queue_size` such jobs, `IDLE_PER_USER` from one user; raises `QueueFull` past that. It never
        delays a job that is waiting when it could start.

        `yields`: `fn(stop)` gives way to requests. When a job is queued while it runs, `stop` is set (a generation
        ends at its next token), and it is started again from the beginning once nothing waits, at most
        `IDLE_RETRIES` times (then its future raises `Cancelled`). Without it, a job that arrives while it runs
        waits for it."""
        job = _Job(fn, Future(), threading.Event() if yields else None, yields=yields, user=user)
        job.restarts = self.IDLE_RETRIES if yields else 0
        with self._cond:
            if self._closed:
                raise RuntimeError("the model worker is closed")
            mine = sum(u == user for u, _ in self._idle)
            if len(self._idle) >= self.queue_size or mine >= self.IDLE_PER_USER:
                raise QueueFull(self.retry_after(), self.queue_size, "the model has no time for background work now")
            self._idle.append((user, job))
            self._cond.notify()
        return job.future

    def arriving(self) -> Arrival:
        """Announce a batchable request that is still being received or decoded: a batch about to start waits
        for it (up to `ARRIVAL_WAIT`). Hand it to `submit_batched`, or call its `done()` if it never comes."""
        with self._cond:
            self._arriving += 1
        return Arrival(self)

    def submit_batched(self, key: Any, item: Any, run: Callable[[list[Any]], list[Any]], *, user: str = "",
                       stop: threading.Event | None = None, arrival: Arrival | None = None) -> Future:
        """Queue `item` for `user`, to run with the other waiting items of the same `key` (up to `max_batch`;
        once the first could start, the batch waits `batch_window` seconds for more, and up to `ARRIVAL_WAIT`
        while announced ones are on their way): `run(items)` returns one result per item (an exception instance
        is raised from that item's future)."""
        return self._queue(_Job(run, Future(), stop, key, item), user, arrival)

    async def run_batched(self, key: Any, item: Any, run: Callable[[list[Any]], list[Any]], *, user: str = "",
                          stop: threading.Event | None = None, arrival: Arrival | None = None) -> Any:
        return await awaited(self.submit_batched(key, item, run, user=user, stop=stop, arrival=arrival), stop)

    def _queue(self, job: _Job, user: str, arrival: Arrival | None = None) -> Future:
        with self._cond:
            if arrival is not None:  # here now (or refused): no batch waits for it any longer
                arrival._end()
            if self._closed:
                raise RuntimeError("the model worker is closed")
            if self._waiting >= self.queue_size:
                raise QueueFull(self.retry_after(), self.queue_size)
            mine = self._queues.get(user)
            if mine is not None and len(mine) >= self.per_user:
                raise QueueFull(self.retry_after(len(mine)), self.per_user,
                                f"you have {len(mine)} model request(s) waiting, the most one user may have; "
                                f"retry after {self.retry_after(len(mine))} s")
            if mine is None:
                mine = self._queues[user] = deque()
            mine.append(job)
            self._waiting += 1
            if self._running is not None:  # background work gives way (`submit_idle(yields=True)`)
                self._running.stop.set()
            self._cond.notify()
        return job.future

    async def run(self, fn: Callable[[], Any], *, user: str = "", stop: threading.Event | None = None) -> Any:
        """Submit `fn` and await its result. Cancelling the awaiting task sets `stop` (the job is dropped, or
        stops at its next step)."""
        return await awaited(self.submit(fn, user=user, stop=stop), stop)

    async def stream(self, start: Callable[[], tuple[Any, Iterator[str]]], *, user: str = "",
                     stop: threading.Event | None = None) -> tuple[Any, AsyncIterator[str]]:
        """A streaming job: `start()` runs in the worker and returns (head, pieces); the pieces are iterated in
        the worker too. Awaits `start` (so its errors reach the caller before any response is sent), then returns
        (head, an async iterator of the pieces); an error while iterating is raised from the iterator. Setting
        `stop` drops the job or ends it at its next piece (the iterator must honour it: `AnswerStream` does)."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        ready: Future = Future()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is reading
                pass

        def job() -> None:
            try:
                head, it = start()
            except BaseException as e:
                ready.set_exception(e)
                return
            ready.set_result(head)
            try:
                for piece in it:
                    put(piece)
                put(_DONE)
            except BaseException as e:  # handed to the request, and counted (a `Cancelled` as stopped)
                put(e)
                raise

        def dropped(f: Future) -> None:  # a job dropped before it started never sets `ready` itself
            if not ready.done() and (f.cancelled() or f.exception() is not None):
                try:
                    ready.set_exception(Cancelled() if f.cancelled() else f.exception())
                except Exception:  # noqa: BLE001 - set meanwhile
                    pass

        future = self.submit(job, user=user, stop=stop)
        future.add_done_callback(dropped)
        head = await awaited(ready, stop, job=future)

        async def read() -> AsyncIterator[str]:
            while True:
                item = await pieces.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        return head, read()

    def _next(self) -> list[_Job] | None:
        """The next job to run (None: closed), fairly: the waiting user whose last job started longest ago. A
        batchable job comes with the waiting jobs of its key, taken in the same order (a batch of one or more)."""
        with self._cond:
            while not self._queues and not (self._idle and not self._closed):
                if self._closed:
                    return None
                self._cond.wait()
            if not self._queues:  # nothing else waits: background work (`submit_idle`)
                job = self._idle.popleft()[1]
                if job.yields:
                    job.stop.clear()
                    self._running = job
                return [job]
            user = min(self._queues, key=lambda u: self._started.get(u, -1))  # ties: first in arrival order
            job = self._queues[user].popleft()
            self._waiting -= 1
            self._served(user)
            batch = [job]
            if job.key is not None:
                self._gather(batch)
                now = time.monotonic()
                window, cap = now + self.batch_window, now + max(self.batch_window, ARRIVAL_WAIT)
                while len(batch) < self.max_batch and not self._closed:
                    until = cap if self._arriving else window  # longer while requests are on their way
                    if (left := until - time.monotonic()) <= 0:
                        break
                    self._cond.wait(left)
                    self._gather(batch)
            return batch

    def _gather(self, batch: list[_Job]) -> None:
        """Move the waiting jobs of `batch`'s key into it, users in serving order, up to `max_batch`."""
        for user in sorted(self._queues, key=lambda u: self._started.get(u, -1)):
            if len(batch) >= self.max_batch:
                return
            jobs = self._queues[user]
            taken = [j for j in jobs if j.key == batch[0].key][: self.max_batch - len(batch)]
            if taken:
                self._queues[user] = deque(j for j in jobs if not any(j is t for t in taken))
                self._waiting -= len(taken)
                batch += taken
                self._served(user)

    def _served(self, user: str) -> None:
        """`user`'s job just started: behind the others from now on, or forgotten when nothing is left waiting
        (so the user's next job goes first again)."""
        if self._queues[user]:
            self._started[user] = next(self._ticks)
        else:
            del self._queues[user]
            self._started.pop(user, None)

    def _run(self) -> None:
        while (batch := self._next()) is not None:
            live = []
            for job in batch:
                if job.yields:  # background work that gives way: its `stop` is for that, not its caller's
                    if job.started or job.future.set_running_or_notify_cancel():
                        job.started = True
                        live.append(job)
                    else:
                        self.dropped += 1
                elif not job.future.set_running_or_notify_cancel():  # its caller cancelled it
                    self.dropped += 1
                elif job.stop is not None and job.stop.is_set():
                    job.future.set_exception(Cancelled())
                    self.dropped += 1
                else:
                    live.append(job)
            if not live:
                continue
            self.busy = True
            t = time.perf_counter()
            try:
                if live[0].yields:
                    results = [live[0].fn(live[0].stop)]
                elif live[0].key is None:
                    results = [live[0].fn()]
                else:
                    results = live[0].fn([job.item for job in live])
                    self.batches += len(live) > 1
                for job, result in zip(live, results, strict=True):
                    if isinstance(result, BaseException):
                        self.stopped += isinstance(result, Cancelled)
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
            except BaseException as e:  # noqa: BLE001 - handed to the callers
                if self._gave_way(live[0], e):
                    continue
                self.stopped += isinstance(e, Cancelled) * len(live)
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(e)
            finally:
                with self._cond:
                    self._running = None
                took = time.perf_counter() - t
                self.busy = False
                self.done += len(live)
                self.seconds += took
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * took

    def _gave_way(self, job: _Job, error: BaseException) -> bool:
        """A background job stopped for a request (`submit_idle(yields=True)`): queued again, first among the
        background jobs, while it has retries left (its future stays pending)."""
        with self._cond:
            self._running = None
            if not (job.yields and isinstance(error, Cancelled) and job.stop.is_set()) or self._closed \
                    or job.restarts <= 0:
                return False
            job.restarts -= 1
            self._idle.appendleft((job.user, job))
            self.yielded += 1
            return True

    def close(self) -> None:
        """Let queued jobs finish (background jobs not yet started are dropped), then stop the thread."""
        with self._cond:
            self._closed = True
            for _, job in self._idle:
                if job.started:  # gave way and waits to start again: its future is running
                    job.future.set_exception(Cancelled())
                else:
                    job.future.cancel()
            self._idle.clear()
            self._cond.notify()
        self._thread.join(timeout=60)
