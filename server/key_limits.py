"""Optional per-API-key limits: requests in flight and tokens per minute (prompt + completion, as the engine
reports them). Over either limit a request is refused with 429 + Retry-After before it is queued. The token
budget is a bucket of one minute's tokens that refills continuously; a request is admitted while the bucket
is not empty, and what it used is taken out when its usage arrives (so one request may overdraw it)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .errors import APIError
from .metrics import Metrics


@dataclass
class _Key:
    in_flight: int = 0
    tokens: float = 0.0
    at: float = field(default_factory=time.monotonic)


class KeyLimits:
    def __init__(self, max_concurrency: int, tokens_per_minute: int, retry_after: int, metrics: Metrics):
        self.max_concurrency, self.rate = max_concurrency, tokens_per_minute / 60.0
        self.capacity, self.retry_after, self._m = float(tokens_per_minute), retry_after, metrics
        self._keys: dict[str, _Key] = {}

    def _get(self, key: str) -> _Key:
        k = self._keys.get(key)
        if k is None:
            k = self._keys[key] = _Key(tokens=self.capacity)
        return k

    def _refill(self, k: _Key) -> None:
        now = time.monotonic()
        k.tokens, k.at = min(self.capacity, k.tokens + (now - k.at) * self.rate), now

    def admit(self, key: str) -> None:
        k = self._get(key)
        if self.max_concurrency and k.in_flight >= self.max_concurrency:
            self._m.rejections.labels("key_concurrency").inc()
            raise APIError(429, f"This API key already has {k.in_flight} requests in flight (the limit). Retry later.",
                           code="key_concurrency", headers={"Retry-After": str(self.retry_after)})
        if self.rate:
            self._refill(k)
            if k.tokens <= 0:
                self._m.rejections.labels("key_token_rate").inc()
                wait = max(1, math.ceil(-k.tokens / self.rate + 1e-9))
                raise APIError(429, "This API key used its tokens per minute. Retry later.", code="key_token_rate",
                               headers={"Retry-After": str(wait)})
        k.in_flight += 1

    def release(self, key: str) -> None:
        self._keys[key].in_flight -= 1

    def spend(self, key: str, tokens: int) -> None:
        if self.rate and tokens > 0:
            k = self._get(key)
            self._refill(k)
            k.tokens -= tokens
