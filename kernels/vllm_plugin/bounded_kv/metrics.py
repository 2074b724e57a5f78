"""Prometheus gauges of the bounded ring, set by the worker once per step and shown on vLLM's own
/metrics: vLLM aggregates every process's gauges through PROMETHEUS_MULTIPROC_DIR (leanserve serve
sets it for the embedded engine; without it the gauges stay in the worker process, unseen).

Token figures count one (layer, KV head) ring of every request in the step (all bounded layers hold
the same number of tokens), so "held" vs "unbounded" is the memory ratio the bound buys.
"""
from __future__ import annotations

import os

_GAUGES = None


def declare() -> None:
    """Create the gauges (0 until a bounded engine sets them) in every vLLM process, so that every
    engine's /metrics names the families the dashboard queries."""
    try:
        _gauges()
    except ImportError:
        pass


def _gauges():
    global _GAUGES
    if _GAUGES is None:
        from prometheus_client import Gauge
        mp = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        kw = (lambda mode: {"multiprocess_mode": mode}) if mp else (lambda mode: {})
        _GAUGES = (
            Gauge("leanserve_kv_tokens_held", "KV tokens the bounded rings hold (per layer and KV head, summed "
                  "over the requests of the last step)", **kw("livesum")),
            Gauge("leanserve_kv_tokens_unbounded", "KV tokens the same requests would hold without the bound "
                  "(their sequence lengths)", **kw("livesum")),
            Gauge("leanserve_kv_requests", "requests in the last engine step", **kw("livesum")),
            Gauge("leanserve_kv_budget_tokens", "retention budget M per request, layer and KV head",
                  **kw("livemax")),
            Gauge("leanserve_kv_ring_capacity_tokens", "ring slots C = M + buffer per request, layer and KV head",
                  **kw("livemax")),
        )
    return _GAUGES


class RingGauges:
    def __init__(self, m: int, b: int):
        self.m, self.b = m, b
        try:
            g = _gauges()
        except ImportError:  # prometheus_client is a vLLM dependency; tolerate its absence in unit tests
            self.g = None
            return
        self.g = g
        g[3].set(m)
        g[4].set(m + b)

    def observe(self, seq_lens) -> None:
        if self.g is None:
            return
        from .plan import ring_count
        held = int(ring_count(seq_lens.long(), self.m, self.b).sum())
        self.g[0].set(held)
        self.g[1].set(int(seq_lens.sum()))
        self.g[2].set(int(seq_lens.numel()))
