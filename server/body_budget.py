"""A bound on the request-body bytes the gateway holds at once: every body being received reserves its
declared length (or what has arrived, when chunked) until it has been parsed, and a body that would
exceed the budget is refused with 429 before it is read, so many unfinished bodies cannot grow memory."""
from __future__ import annotations

from .errors import APIError
from .metrics import Metrics


class BodyBudget:
    def __init__(self, limit: int, retry_after: int, metrics: Metrics):
        self.limit, self.retry_after, self._m = limit, retry_after, metrics
        self.reserved = 0

    def reserve(self, n: int) -> None:
        if n and self.reserved + n > self.limit:
            self._m.rejections.labels("body_budget").inc()
            # The body is left unread, so the connection cannot carry another request: close it. Left open,
            # uvicorn would cancel its keep-alive timer on the body's next bytes and hold it forever.
            raise APIError(429, "The server is receiving too many request bodies at once. Retry later.",
                           code="body_budget", headers={"Retry-After": str(self.retry_after), "Connection": "close"})
        self.reserved += n
        self._m.body_bytes_reserved.set(self.reserved)

    def free(self, n: int) -> None:
        self.reserved -= n
        self._m.body_bytes_reserved.set(self.reserved)
