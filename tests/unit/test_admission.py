"""Admission on its own: FIFO hand-over, bounded queue, no leaked slots on cancellation."""
import asyncio

import pytest

from server.admission import Admission
from server.errors import APIError
from server.metrics import Metrics


def make(c=1, q=2, t=5.0):
    return Admission(c, q, t, 1, Metrics())


async def settle(cond, steps=1000):
    """Let the loop run the other tasks until cond() holds (no sleeping for a guessed time)."""
    for _ in range(steps):
        if cond():
            return True
        await asyncio.sleep(0)
    return cond()


async def test_fifo_and_handover():
    adm = make(c=1, q=3)
    await adm.acquire()
    order = []

    async def worker(i):
        await adm.acquire()
        order.append(i)
        await asyncio.sleep(0)
        adm.release()

    tasks = []
    for i in range(3):  # queued in this order
        tasks.append(asyncio.create_task(worker(i)))
        assert await settle(lambda: len(adm._waiters) == i + 1)
    assert adm.running == 1
    adm.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and adm.running == 0


async def test_cancelled_waiter_leaves_no_trace():
    adm = make(c=1, q=3)
    await adm.acquire()
    t = asyncio.create_task(adm.acquire())
    assert await settle(lambda: len(adm._waiters) == 1)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert len(adm._waiters) == 0
    adm.release()
    assert adm.running == 0
    await adm.acquire()  # capacity is intact
    assert adm.running == 1


async def test_queue_bound_and_timeout():
    adm = make(c=1, q=1, t=0.05)
    await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    assert await settle(lambda: len(adm._waiters) == 1)
    with pytest.raises(APIError) as full:
        await adm.acquire()
    assert full.value.status == 429 and full.value.code == "queue_full"
    with pytest.raises(APIError) as late:
        await waiter
    assert late.value.code == "queue_timeout" and late.value.headers["Retry-After"] == "1"
    adm.release()
    assert adm.running == 0
