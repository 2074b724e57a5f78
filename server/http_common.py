"""HTTP pieces the relay, the trimming sinks and the auth middleware share: response headers, sending a
JSON answer over ASGI, and how a failure while talking to an engine becomes an error for the client."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .errors import APIError
from .sse import SSEError

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell reverse proxies not to buffer the stream
]
JSON_HEADERS = [(b"content-type", b"application/json")]
# Sent to engines: the relay forwards bytes, so nobody between may compress them (aiohttp would ask for gzip).
UPSTREAM_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}
# aiohttp for the data plane: its C parser costs ~4x less CPU per relayed token than httpx (measured).
CONNECT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
# Everything the engine connection can throw at us: transport, HTTP parsing, malformed event streams.
UPSTREAM_ERRORS = (aiohttp.ClientError, SSEError, asyncio.TimeoutError)
MAX_ERROR_BODY = 64 * 1024  # bytes of an engine's error body the gateway reads
RETRY_STATUSES = (502, 503)  # engine answers that mean "not processed here": safe on another replica


class Retry(Exception):
    """The engine failed before anything reached the client. `retry`: whether another replica may try
    (the request was not processed, or was aborted); otherwise `error` goes to the client as it is."""

    def __init__(self, error: APIError, retry: bool = True):
        super().__init__(error.message)
        self.error, self.retry = error, retry


def upstream_failure(e: BaseException, kind: str) -> tuple[str, APIError]:
    """(metric kind, error for the client) of a failure while talking to an engine; kind: "connect", "read"
    or "stream". A read timeout is a timeout whatever else it is (aiohttp's ServerTimeoutError is also a
    connection error): 504, and the engine is not marked down for being slow."""
    if isinstance(e, asyncio.TimeoutError):
        return "timeout", APIError(504, "the engine sent nothing within the upstream timeout", code="engine_timeout")
    if isinstance(e, (aiohttp.ClientResponseError, SSEError)):  # garbage, an oversized header, a huge event
        return "protocol", APIError(502, f"the engine broke the HTTP protocol: {_short(e)}",
                                    code="engine_protocol_error")
    if kind == "connect" and isinstance(e, aiohttp.ClientConnectorError):  # refused, unreachable, DNS
        return kind, APIError(503, f"engine unreachable: {type(e).__name__}", code="engine_unavailable")
    if kind == "connect":  # connected, then closed before answering (a crash, or a pooled connection's race)
        return "disconnect", APIError(503, f"the engine closed the connection: {type(e).__name__}",
                                      code="engine_unavailable")
    return kind, APIError(502, f"the engine connection broke: {type(e).__name__}", code="engine_error")


def stream_ended() -> APIError:
    return APIError(502, "the engine stream ended unexpectedly", code="engine_error")


async def open_upstream(gw: Any, replica: Any, path: str, payload: bytes) -> aiohttp.ClientResponse:
    """POST `payload` to one replica: the response, or Retry with the client's error (a refused connection
    also marks the replica down at once). The relay and the trimmed continuation both open engine calls here."""
    try:
        return await gw.client.post(replica.url + path, data=payload, headers=UPSTREAM_HEADERS)
    except UPSTREAM_ERRORS as e:
        kind, err = upstream_failure(e, "connect")
        gw.metrics.upstream_errors.labels(replica.label, kind).inc()
        if kind == "connect":
            gw.pool.set_health(replica, False, err.message)
        raise Retry(err)


def _short(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    return str(msg)[:200]


async def read_capped(resp: aiohttp.ClientResponse, limit: int = MAX_ERROR_BODY) -> bytes:
    """At most `limit` bytes of a response body (an error body is for a message, not for memory)."""
    chunks, size = [], 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def error_event(err: APIError) -> bytes:
    return b"data: " + json.dumps(err.body()).encode() + b"\n\n"


async def send_json(send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = JSON_HEADERS + [(b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})
