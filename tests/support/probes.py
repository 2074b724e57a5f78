"""Polling helpers for tests against live servers: Prometheus samples and waiting for a condition."""
from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` (with these label values) on url/metrics."""
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def samples(url: str, *families: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of the named families (all when none) on url/metrics."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if families and fam.name not in families:
            continue
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def increments(before: dict, after: dict) -> dict:
    """The samples that changed, by how much (new samples count from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def until(cond, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """wait_for inside an event loop: cond() runs in a thread, the loop keeps serving its tasks."""
    t0 = time.monotonic()
    while not await asyncio.to_thread(cond):
        if time.monotonic() - t0 > timeout:
            return False
        await asyncio.sleep(interval)
    return True


def wait_for(cond, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll cond() until it is true (True) or timeout seconds pass (False)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(interval)
    return True
