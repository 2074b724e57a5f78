"""Prometheus metrics of the gateway. Labels stay bounded: model, endpoint, status, finish_reason,
replica (from configuration), reason — never request or user ids."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class RequestMetrics:
    """Label-bound children for one (model, endpoint): .labels() is the costly part of an observation."""

    def __init__(self, m: "Metrics", model: str, endpoint: str):
        self.ttft = m.ttft.labels(model, endpoint)
        self.itl = m.itl.labels(model, endpoint)
        self.e2e = m.e2e.labels(model, endpoint)
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.completion_tokens = m.completion_tokens.labels(model)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        p = "leanserve_"
        self.requests = Counter(p + "requests", "Requests answered, by final HTTP status",
                                ["model", "endpoint", "status"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first generated token",
                              ["model", "endpoint"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Gap between consecutive streamed token events",
                             ["model", "endpoint"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Arrival to last byte",
                             ["model", "endpoint"], buckets=E2E_BUCKETS, registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "Time spent waiting for admission",
                                    buckets=QUEUE_BUCKETS, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens (engine-reported usage)",
                                     ["model"], registry=r)
        self.completion_tokens = Counter(p + "completion_tokens", "Generated tokens (engine-reported usage)",
                                         ["model"], registry=r)
        self.finished = Counter(p + "finished_choices", "Choices finished, by finish_reason",
                                ["model", "finish_reason"], registry=r)
        self.in_flight = Gauge(p + "requests_in_flight", "Requests admitted and not finished", registry=r)
        self.queued = Gauge(p + "requests_queued", "Requests waiting for admission", registry=r)
        self.rejections = Counter(p + "rejections", "Requests refused before reaching an engine",
                                  ["reason"], registry=r)
        self.disconnects = Counter(p + "client_disconnects", "Clients that went away before the end",
                                   ["endpoint", "phase"], registry=r)
        self.upstream_errors = Counter(p + "upstream_errors", "Failures talking to an engine",
                                       ["replica", "kind"], registry=r)
        self.engine_healthy = Gauge(p + "engine_healthy", "1 when the engine's last health probe passed",
                                    ["replica"], registry=r)
        self.engine_in_flight = Gauge(p + "engine_requests_in_flight", "Requests the gateway has open on an engine",
                                      ["replica"], registry=r)
        self._bound: dict[tuple[str, str], RequestMetrics] = {}

    def bound(self, model: str, endpoint: str) -> RequestMetrics:
        key = (model, endpoint)
        b = self._bound.get(key)
        if b is None:
            b = self._bound[key] = RequestMetrics(self, model, endpoint)
        return b
