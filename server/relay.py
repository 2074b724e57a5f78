"""Relay one OpenAI request to an engine: admission, replica choice with failover, streaming relay.

A pure ASGI response (no BaseHTTPMiddleware): while the request is served we also listen on `receive`
for http.disconnect, so a client that leaves — in the queue, before the first token or mid-stream —
cancels the work and closes the upstream request, which makes vLLM abort it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from .admission import Admission
from .errors import APIError, normalize_upstream_error
from .metrics import Metrics
from .replicas import Replica, ReplicaPool
from .schema import engine_body, parse_body
from .sse import DONE, DONE_EVENT, FINISHED, TOKEN, USAGE, EventSplitter, classify, load_event
from .trimming.policy import TrimConfig
from .trimming.stream import TrimPlan, TrimService, plan_trim

log = logging.getLogger("leanserve.relay")

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell reverse proxies not to buffer the stream
]
JSON_HEADERS = [(b"content-type", b"application/json")]
# aiohttp for the data plane: its C parser costs ~4x less CPU per relayed token than httpx (measured).
CONNECT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)


class _Retry(Exception):
    """The engine failed before anything reached the client: try another replica."""


def upstream_failure(e: BaseException, kind: str) -> tuple[str, APIError]:
    """(metric kind, error for the client) of a failure while talking to an engine; kind: "connect", "read"
    or "stream". A read timeout is a timeout whatever else it is (aiohttp's ServerTimeoutError is also a
    connection error): 504, and the engine is not marked down for being slow."""
    if isinstance(e, asyncio.TimeoutError):
        return "timeout", APIError(504, "the engine sent nothing within the upstream timeout", code="engine_timeout")
    if kind == "connect":
        return kind, APIError(503, f"engine unreachable: {type(e).__name__}", code="engine_unavailable")
    return kind, APIError(502, f"the engine connection broke: {type(e).__name__}", code="engine_error")


@dataclass
class Gateway:
    """Everything a relayed request needs, built once per app."""
    pool: ReplicaPool
    admission: Admission
    client: aiohttp.ClientSession
    metrics: Metrics
    trim: TrimService | None = None  # thought trimming settings and verifiers


async def send_json(send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = JSON_HEADERS + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


async def _wait_disconnect(receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


class RelayRoutes:
    """The two hot endpoints, served in pure ASGI in front of FastAPI: routing and dependency
    resolution would cost more per request than the whole relay (measured)."""

    def __init__(self, app, state: dict, max_body_bytes: int):
        self.app, self.state, self.limit = app, state, max_body_bytes

    async def __call__(self, scope, receive, send):
        endpoint = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            err = APIError(405, "Method Not Allowed", headers={"Allow": "POST"})
            return await send_json(send, 405, err.body(), err.headers)
        arrival = time.perf_counter()
        gw: Gateway = self.state["gw"]
        try:
            raw = await _read_body(scope, receive, self.limit)
            if raw is None:  # the client left while sending its body
                return
            body, trim = parse_body(raw, endpoint)
        except APIError as e:
            gw.metrics.requests.labels("unknown", endpoint, str(e.status)).inc()
            return await send_json(send, e.status, e.body(), e.headers)
        await RelayResponse(gw, body, trim, scope["path"], endpoint, arrival)(scope, receive, send)


async def _read_body(scope, receive, limit: int) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise APIError(413, f"request body larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


class RelayResponse:
    """ASGI app for one proxied request."""

    def __init__(self, gw: Gateway, body: dict, trim: TrimConfig | None, path: str, endpoint: str, arrival: float):
        self.gw, self.body, self.path, self.endpoint, self.arrival = gw, body, path, endpoint, arrival
        self.model: str = body.get("model") or ""
        self.metric_model = "unknown"  # client-chosen names never become label values
        self.stream = bool(body.get("stream"))
        opts = body.get("stream_options") or {}
        self.client_wants_usage = bool(opts.get("include_usage"))
        self.status = 0  # final status for metrics; 499 = client went away
        self.started = False  # response headers sent to the client
        # Thought trimming (server/trimming/stream.py) serves this request instead of the plain relay.
        self.trim: TrimPlan | None = plan_trim(gw, trim, body, endpoint)

    # ---- ASGI entry ---------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        def tracked_send(msg):
            if msg["type"] == "http.response.start":
                self.started = True
                self.status = msg["status"]
            return send(msg)

        serve = asyncio.ensure_future(self._serve(tracked_send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({serve, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not serve.done() and not watch.done():  # we were cancelled ourselves (server shutdown)
                serve.cancel()
                watch.cancel()
        if serve in done:
            watch.cancel()
            serve.result()
        else:
            serve.cancel()
            try:
                await serve
            except asyncio.CancelledError:
                pass
            self.gw.metrics.disconnects.labels(self.endpoint, "streaming" if self.started else "waiting").inc()
            self.status = 499
        self.gw.metrics.requests.labels(self.metric_model, self.endpoint, str(self.status)).inc()
        self.gw.metrics.bound(self.metric_model, self.endpoint).e2e.observe(time.perf_counter() - self.arrival)

    # ---- the request --------------------------------------------------------------------------
    async def _serve(self, send) -> None:
        gw = self.gw
        try:
            if not self.model:
                self.model = gw.pool.default_model() or ""
                if not self.model:
                    raise APIError(400, "you must provide a model parameter", param="model", code="missing_model")
                self.body["model"] = self.model
            gw.pool.pick(self.model)  # fail fast (404/503) before queueing
            self.metric_model = self.model  # a served model: safe as a label
            await gw.admission.acquire()
        except APIError as e:
            await send_json(send, e.status, e.body(), e.headers)
            return
        try:
            await self._dispatch(send)
        finally:
            gw.admission.release()

    def _upstream_body(self) -> bytes:
        if self.trim is not None:
            return self.trim.upstream_body(self.body)
        body = engine_body(self.body)
        if self.stream:
            # Always ask the engine for usage so token metrics are exact; dropped again if the client didn't ask.
            body = dict(body)
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return json.dumps(body).encode()

    async def _dispatch(self, send) -> None:
        gw = self.gw
        payload = self._upstream_body()
        tried: set[Replica] = set()
        last_error: APIError | None = None
        while True:
            try:
                replica = gw.pool.pick(self.model, exclude=tried)
            except APIError as e:
                e = last_error if (last_error and e.status == 503) else e
                await send_json(send, e.status, e.body(), e.headers)
                return
            tried.add(replica)
            gw.pool.acquire(replica)
            try:
                await self._attempt(replica, payload, send)
                return
            except _Retry as r:
                last_error = r.args[0]
                log.warning("engine %s failed before the response started (%s); trying another",
                            replica.url, last_error.message)
            finally:
                gw.pool.release(replica)

    async def _attempt(self, replica: Replica, payload: bytes, send) -> None:
        gw = self.gw
        try:
            resp = await gw.client.post(replica.url + self.path, data=payload,
                                        headers={"content-type": "application/json"})
        except (*CONNECT_ERRORS, asyncio.TimeoutError) as e:
            kind, err = upstream_failure(e, "connect")
            gw.metrics.upstream_errors.labels(replica.url, kind).inc()
            if kind == "connect":
                gw.pool.set_health(replica, False)
            raise _Retry(err)
        try:
            if resp.status != 200:
                raw = await resp.read()
                err = normalize_upstream_error(resp.status, raw)
                if resp.status >= 500:
                    gw.metrics.upstream_errors.labels(replica.url, f"http_{resp.status}").inc()
                    raise _Retry(APIError(resp.status, err["error"]["message"], code=err["error"]["code"]))
                await send_json(send, resp.status, err)
            elif self.trim is not None:  # streaming or not: the engine streams, trimming relays
                await self.trim.relay(self, resp, replica, send)
            elif self.stream:
                await self._relay_stream(resp, replica, send)
            else:
                await self._relay_json(resp, replica, send)
        finally:
            # An unfinished body closes the connection, which is what makes vLLM abort the request;
            # a finished one goes back to the keep-alive pool.
            resp.release() if resp.content.at_eof() else resp.close()

    async def _relay_json(self, resp: aiohttp.ClientResponse, replica: Replica, send) -> None:
        try:
            raw = await resp.read()
        except (*CONNECT_ERRORS, asyncio.TimeoutError) as e:
            kind, err = upstream_failure(e, "read")
            self.gw.metrics.upstream_errors.labels(replica.url, kind).inc()
            raise _Retry(err)
        try:
            data = json.loads(raw)
            self._account(data.get("usage"), data.get("choices") or [])
        except (ValueError, AttributeError):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": raw})

    def _account(self, usage: dict | None, choices: list) -> None:
        m = self.gw.metrics
        if usage:
            b = m.bound(self.model, self.endpoint)
            b.prompt_tokens.inc(usage.get("prompt_tokens") or 0)
            b.completion_tokens.inc(usage.get("completion_tokens") or 0)
        for c in choices:
            if c.get("finish_reason"):
                m.finished.labels(self.model, str(c["finish_reason"])).inc()

    async def _relay_stream(self, resp: aiohttp.ClientResponse, replica: Replica, send) -> None:
        m = self.gw.metrics
        b = m.bound(self.model, self.endpoint)
        ttft, itl = b.ttft, b.itl
        last_token_at = 0.0
        splitter = EventSplitter()
        saw_done, failure = False, None
        try:
            async for chunk in resp.content.iter_any():
                events = splitter.feed(chunk)
                if not events:
                    continue
                out = []
                now = time.perf_counter()
                for ev in events:
                    kind = classify(ev)
                    if kind is TOKEN:
                        if last_token_at:
                            itl.observe(now - last_token_at)
                        else:
                            ttft.observe(now - self.arrival)
                        last_token_at = now
                        if b'"finish_reason":' in ev and FINISHED.search(ev):
                            self._account(None, _choices(ev))
                    elif kind is USAGE:
                        usage = load_event(ev).get("usage")
                        self._account(usage, [])
                        if not self.client_wants_usage:
                            continue
                    elif kind is DONE_EVENT:
                        saw_done = True
                    out.append(ev)
                if out:
                    if not self.started:
                        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                    await send({"type": "http.response.body", "body": b"\n\n".join(out) + b"\n\n",
                                "more_body": True})
        except (*CONNECT_ERRORS, asyncio.TimeoutError) as e:
            kind, failure = upstream_failure(e, "stream")
            m.upstream_errors.labels(replica.url, kind).inc()
            if not self.started:
                raise _Retry(failure)
            log.warning("engine %s broke mid-stream: %r", replica.url, e)
        if not self.started:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        tail = b""
        if not saw_done:  # the engine stopped without finishing: tell the client in-band, then end cleanly
            err = failure or APIError(502, "the engine stream ended unexpectedly", code="engine_error")
            tail = b"data: " + json.dumps(err.body()).encode() + b"\n\n" + DONE + b"\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def _choices(ev: bytes) -> list:
    choices = load_event(ev).get("choices")
    return choices if isinstance(choices, list) else []
