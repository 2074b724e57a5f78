"""Admission control: at most `max_concurrency` requests run; up to `max_queue` wait (FIFO) for at
most `queue_timeout` seconds; anything beyond is refused with 429 + Retry-After (as TGI does)."""
from __future__ import annotations

import asyncio
import collections
import time

from .errors import APIError
from .metrics import Metrics


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout: float, retry_after: int,
                 metrics: Metrics):
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._m = metrics

    def _reject(self, reason: str, message: str) -> APIError:
        self._m.rejections.labels(reason).inc()
        return APIError(429, message, code=reason, headers={"Retry-After": str(self.retry_after)})

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited. Cancellation (client gone) leaves no trace."""
        if self.running < self.max_concurrency and not self._waiters:
            self.running += 1
            self._m.in_flight.set(self.running)
            self._m.queue_wait.observe(0.0)
            return 0.0
        if len(self._waiters) >= self.max_queue:
            raise self._reject("queue_full", "The server is overloaded: too many requests are waiting. Retry later.")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._m.queued.set(len(self._waiters))
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout)
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                # The slot was handed over just as we gave up: pass it on, it must not leak.
                self._release_slot()
            else:
                fut.cancel()
                self._waiters.remove(fut)
            self._m.queued.set(len(self._waiters))
            if isinstance(e, asyncio.TimeoutError):
                raise self._reject("queue_timeout",
                                   f"The server is overloaded: no capacity within {self.queue_timeout:g}s. Retry later.")
            raise
        waited = time.perf_counter() - t0
        self._m.queue_wait.observe(waited)
        return waited

    def release(self) -> None:
        self._release_slot()

    def _release_slot(self) -> None:
        # Hand the slot directly to the oldest waiter so `running` never dips and late-comers can't jump the queue.
        while self._waiters:
            fut = self._waiters.popleft()
            self._m.queued.set(len(self._waiters))
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1
        self._m.in_flight.set(self.running)
