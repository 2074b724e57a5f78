"""Polling helpers for tests against live servers: Prometheus samples and waiting for a condition."""
from __future__ import annotations

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


def wait_for(cond, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll cond() until it is true (True) or timeout seconds pass (False)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        time.sleep(interval)
    return True
