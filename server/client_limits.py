"""Limits on clients, enforced in uvicorn's httptools protocol (where the bytes arrive; the app would see a
request only once its headers are complete). uvicorn has no header-size, header-count or header-deadline
knob for httptools (h11_max_incomplete_event_size exists for h11 only, which costs more CPU per relayed
token), and its limit_concurrency counts tasks and answers in plain text, so these four live here:

* header deadline: request line + headers must arrive within `header_timeout` of the connection (or of the
  request's first byte on a kept-alive connection) — slow-loris and silent connections are closed (408);
* header size and count: at most `max_header_bytes` and `max_headers` (431, then close);
* connections: at most `max_connections` open; one more gets 503 and is closed at once;
* lingering close: a connection closed while the client is still sending (a refused body, a 431 header) is
  half-closed after the answer and its input discarded until the client closes or `linger` seconds pass.
  Closed outright, the kernel would answer the unread bytes with a reset and the client lose the answer.

The body deadline and the bound on buffered bodies are the relay's (server/relay.py, server/body_budget.py):
bodies are read only by the relay routes."""
from __future__ import annotations

import json
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import error_body
from .metrics import Metrics

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


@dataclass(frozen=True)
class ClientLimits:
    header_timeout: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    max_connections: int = 2048
    linger: float = 5.0


class _LingeringTransport:
    """What a request cycle sees of the connection: close() lingers while the request is still arriving."""

    def __init__(self, transport, protocol):
        self._t, self._p = transport, protocol

    def close(self) -> None:
        self._p.close_lingering()

    def is_closing(self) -> bool:
        return self._p.lingering or self._t.is_closing()

    def __getattr__(self, name):
        return getattr(self._t, name)


def raw_error(status: int, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error response in OpenAI's shape, that closes the connection."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS[status], len(body))) + body


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing a request that was refused."""


def limited_protocol(limits: ClientLimits, metrics: Metrics | None = None) -> type:
    """uvicorn `http=` protocol class enforcing `limits`."""

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._rejected = False
            self._hdr_bytes = self._hdr_count = 0
            self._raw = 0  # bytes fed while the current request's headers are incomplete
            self._headers_done = False
            self._timer = None
            self.lingering = False
            self._in_message = False  # a request has begun and its last body byte has not been parsed
            if len(self.connections) > limits.max_connections:
                self._reject(503, "too many open connections; retry later", "too_many_connections")
                return
            self._arm()

        def _arm(self) -> None:
            self._timer = self.loop.call_later(limits.header_timeout, self._header_timeout)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _header_timeout(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self._reject(408, f"request headers did not arrive within {limits.header_timeout:g}s",
                             "header_timeout")

        def _reject(self, status: int, message: str, code: str) -> None:
            self._rejected = True
            self._disarm()
            if metrics is not None:
                metrics.client_limit_hits.labels(code).inc()
            if not self.transport.is_closing():
                self.transport.write(raw_error(status, message, code))
                self.close_lingering()

        def close_lingering(self) -> None:
            t = self.transport
            if self.lingering or t.is_closing():
                return
            if not self._in_message or not t.can_write_eof():
                t.close()
                return
            self.lingering = True
            self._disarm()
            t.write_eof()  # the answer, then FIN; the client's close (eof_received) or the timer ends it
            self.flow.resume_reading()
            self._timer = self.loop.call_later(limits.linger, t.close)

        def on_response_complete(self) -> None:
            if self._in_message:  # answered before its body arrived: the rest cannot be trusted to come
                self.close_lingering()
            if self.lingering:
                self.server_state.total_requests += 1
                return
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._rejected or self.lingering:
                return  # discarded: the answer has been sent
            # httptools hands a header over only once it is complete: bound what it buffers meanwhile.
            if not self._headers_done and self._raw > limits.max_header_bytes:
                self._reject(431, f"request headers larger than {limits.max_header_bytes} bytes",
                             "headers_too_large")
                return
            super().data_received(data)
            if not self._headers_done:
                self._raw += len(data)

        def send_400_response(self, msg: str) -> None:
            if not self._rejected:  # a callback refused the request and has answered already
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_message = True
            self._hdr_bytes = self._hdr_count = self._raw = 0
            self._headers_done = False
            if self._timer is None:  # a kept-alive connection's next request
                self._arm()

        def _count(self, n: int, header: bool) -> None:
            self._hdr_bytes += n
            self._hdr_count += header
            if self._hdr_bytes > limits.max_header_bytes:
                self._reject(431, f"request headers larger than {limits.max_header_bytes} bytes",
                             "headers_too_large")
                raise _Rejected
            if self._hdr_count > limits.max_headers:
                self._reject(431, f"more than {limits.max_headers} request headers", "too_many_headers")
                raise _Rejected

        def on_url(self, url: bytes) -> None:
            self._count(len(url), False)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4, True)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            self._headers_done, self._raw = True, 0
            super().on_headers_complete()
            if self.cycle is not None and not isinstance(self.cycle.transport, _LingeringTransport):
                self.cycle.transport = _LingeringTransport(self.transport, self)

        def on_message_complete(self) -> None:
            self._headers_done = True  # nothing to bound until the next request begins
            self._in_message = False
            super().on_message_complete()

    return LimitedHttpToolsProtocol
