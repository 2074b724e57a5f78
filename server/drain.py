"""Graceful shutdown. On SIGTERM the gateway keeps listening but turns away new work: /ready and new
relay requests answer 503 at once, in-flight requests run on for up to `grace` seconds, and those still
running then end cleanly (an error event + [DONE] for a started stream, a 503 otherwise); only then does
uvicorn close the listener, and the process exits 0."""
from __future__ import annotations

import logging
import signal
import time
from typing import Any, Protocol

import uvicorn

log = logging.getLogger("leanserve.drain")


class Cuttable(Protocol):
    def cut(self) -> None: ...


class Drain:
    def __init__(self) -> None:
        self.stopping = False
        self.since = 0.0
        self.active: set[Cuttable] = set()  # relay requests in flight
        self.cut_sent = False

    def begin(self) -> None:
        if not self.stopping:
            self.stopping, self.since = True, time.monotonic()
            log.info("draining: %d request(s) in flight", len(self.active))

    def cut_all(self) -> None:
        self.cut_sent = True
        if self.active:
            log.warning("grace period over: ending %d request(s) still in flight", len(self.active))
        for r in list(self.active):
            r.cut()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its own shutdown (a second SIGINT still forces exit)."""

    CUT_WAIT = 5.0  # seconds the cut requests get to write their endings

    def __init__(self, config: uvicorn.Config, drain: Drain, grace: float):
        super().__init__(config)
        self.drain, self.grace = drain, grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drain.stopping and sig == signal.SIGINT:
            return super().handle_exit(sig, frame)  # the second Ctrl-C: uvicorn's forced exit
        self._captured_signals.append(sig)
        self.drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        d = self.drain
        if not d.stopping:
            return False
        if not d.active:
            return True
        waited = time.monotonic() - d.since
        if not d.cut_sent and waited >= self.grace:
            d.cut_all()
        return d.cut_sent and waited >= self.grace + self.CUT_WAIT
