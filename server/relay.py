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
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .admission import Admission
from .auth import KEY_SCOPE
from .body_budget import BodyBudget
from .drain import Drain
from .errors import APIError, normalize_upstream_error
from .http_common import (JSON_HEADERS, RETRY_STATUSES, SSE_HEADERS, UPSTREAM_ERRORS, Retry, error_event,
                          open_upstream, read_capped, send_json, stream_ended, upstream_failure)
from .key_limits import KeyLimits
from .metrics import Metrics
from .replicas import Replica, ReplicaPool
from .schema import engine_body, parse_body
from .sse import DONE, DONE_EVENT, FINISHED, TOKEN, USAGE, EventSplitter, classify, load_event
from .trimming.policy import TrimConfig
from .trimming.stream import TrimPlan, TrimService, plan_trim

log = logging.getLogger("leanserve.relay")

@dataclass(frozen=True)
class Deadlines:
    """Upstream time limits of one request (seconds): first token (streams and trimmed requests) per
    attempt, and the total across all attempts; `retries`: further replicas tried after a safe failure."""
    first_token: float = 300.0
    total: float = 1800.0
    retries: int = 2
    body: float = 30.0  # reading the client's body


@dataclass
class Gateway:
    """Everything a relayed request needs, built once per app."""
    pool: ReplicaPool
    admission: Admission
    client: aiohttp.ClientSession
    metrics: Metrics
    trim: TrimService | None = None  # thought trimming settings and verifiers
    deadlines: Deadlines = field(default_factory=Deadlines)
    drain: Drain = field(default_factory=Drain)
    bodies: BodyBudget | None = None
    key_limits: KeyLimits | None = None  # per-API-key concurrency and tokens per minute


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
        rid = request_id(scope["headers"])
        try:
            if gw.drain.stopping:
                raise APIError(503, "The server is shutting down; retry on another instance.",
                               code="shutting_down", headers={"Connection": "close"})
            raw = await _read_body(scope, receive, self.limit, gw)
            if raw is None:  # the client left while sending its body
                return
            body, trim = parse_body(raw, endpoint)
        except APIError as e:
            gw.metrics.requests.labels("unknown", endpoint, str(e.status)).inc()
            return await send_json(send, e.status, e.body(), {**e.headers, "x-request-id": rid})
        await RelayResponse(gw, body, trim, scope["path"], endpoint, arrival, rid,
                            scope.get(KEY_SCOPE))(scope, receive, send)


def request_id(headers) -> str:
    """The client's X-Request-Id when it is a sane token, else a new one; echoed in the response and logs."""
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= 128 and value.isascii() and value.replace(b"-", b"").replace(b"_", b"").replace(
                    b".", b"").replace(b":", b"").isalnum():
                return value.decode()
            break
    return uuid.uuid4().hex


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body larger than {limit} bytes", code="body_too_large",
                    headers={"Connection": "close"})


async def _read_body(scope, receive, limit: int, gw: Gateway) -> bytes | None:
    declared = 0
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            declared = int(value)
            if declared > limit:
                raise _too_large(limit)
    budget, reserved = gw.bodies, 0
    if budget is not None and declared:
        budget.reserve(declared)  # 429 before a byte is read when too many bodies are arriving
        reserved = declared
    chunks, size = [], 0
    try:
        async with asyncio.timeout(gw.deadlines.body):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return None
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                if budget is not None and size > reserved:  # chunked, or more than declared
                    budget.reserve(size - reserved)
                    reserved = size
                chunks.append(chunk)
                if not msg.get("more_body"):
                    return b"".join(chunks)
    except TimeoutError:
        gw.metrics.client_limit_hits.labels("body_timeout").inc()
        raise APIError(408, f"the request body did not arrive within {gw.deadlines.body:g}s",
                       code="body_timeout", headers={"Connection": "close"})
    finally:
        if reserved:
            budget.free(reserved)


class RelayResponse:
    """ASGI app for one proxied request."""

    def __init__(self, gw: Gateway, body: dict, trim: TrimConfig | None, path: str, endpoint: str, arrival: float,
                 rid: str = "", key: str | None = None):
        self.gw, self.body, self.path, self.endpoint, self.arrival = gw, body, path, endpoint, arrival
        self.key = key if gw.key_limits is not None else None  # the API key's id, when per-key limits apply
        self.rid = rid or uuid.uuid4().hex
        self._rid_header = (b"x-request-id", self.rid.encode())
        self.model: str = body.get("model") or ""
        self.metric_model = "unknown"  # client-chosen names never become label values
        self.stream = bool(body.get("stream"))
        opts = body.get("stream_options") or {}
        self.client_wants_usage = bool(opts.get("include_usage"))
        self.status = 0  # final status for metrics; 499 = client went away
        self.started = False  # response headers sent to the client
        self.finished = False  # the last body message was sent
        self.cut_off = False  # ended by the drain at shutdown
        self._serving: asyncio.Future | None = None
        self._timer: asyncio.Timeout | None = None  # the current attempt's deadline
        self.deadline = 0.0  # loop time by which the whole request must be done
        # Thought trimming (server/trimming/stream.py) serves this request instead of the plain relay.
        self.trim: TrimPlan | None = plan_trim(gw, trim, body, endpoint)

    # ---- ASGI entry ---------------------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        def tracked_send(msg):
            if msg["type"] == "http.response.start":
                self.started = True
                self.status = msg["status"]
                msg = {**msg, "headers": [*msg["headers"], self._rid_header]}
            elif not msg.get("more_body"):
                self.finished = True
            return send(msg)

        serve = self._serving = asyncio.ensure_future(self._serve(tracked_send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        drain = self.gw.drain
        drain.active.add(self)
        try:
            done, _ = await asyncio.wait({serve, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.active.discard(self)
            if not serve.done() and not watch.done():  # we were cancelled ourselves (server shutdown)
                serve.cancel()
                watch.cancel()
        if serve in done:
            watch.cancel()
            if serve.cancelled() and self.cut_off:
                await self._end_at_shutdown(tracked_send)
            else:
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

    def cut(self) -> None:
        """The drain's grace period is over: stop serving, _end_at_shutdown writes the ending."""
        self.cut_off = True
        if self._serving is not None:
            self._serving.cancel()

    async def _end_at_shutdown(self, send) -> None:
        err = APIError(503, "The server is shutting down; the response was cut short.", code="shutting_down")
        if self.finished:
            return
        if not self.started:
            return await send_json(send, 503, err.body(), {"Connection": "close"})
        tail = error_event(err) + DONE + b"\n\n" if self.stream else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})

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
            if self.key is not None:
                gw.key_limits.admit(self.key)
        except APIError as e:
            await send_json(send, e.status, e.body(), e.headers)
            return
        try:
            try:
                await gw.admission.acquire()
            except APIError as e:
                await send_json(send, e.status, e.body(), e.headers)
                return
            try:
                await self._dispatch(send)
            finally:
                gw.admission.release()
        finally:
            if self.key is not None:
                gw.key_limits.release(self.key)

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
        gw, limits = self.gw, self.gw.deadlines
        payload = self._upstream_body()
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + limits.total  # all attempts together: N replicas never mean N waits
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
                await self._attempt_in_time(replica, payload, send)
                return
            except Retry as r:
                last_error = r.error
                if not r.retry or len(tried) > limits.retries or loop.time() >= self.deadline:
                    await send_json(send, r.error.status, r.error.body(), r.error.headers)
                    return
                log.warning("request %s: engine %s failed before the response started (%s); trying another",
                            self.rid, replica.label, last_error.message)
            finally:
                gw.pool.release(replica)

    def first_token_seen(self) -> None:
        """The first-token deadline is met: from now on only the total one applies."""
        t = self._timer
        if t is not None and t.when() != self.deadline:
            t.reschedule(self.deadline)

    async def _attempt_in_time(self, replica: Replica, payload: bytes, send) -> None:
        loop = asyncio.get_running_loop()
        watches_tokens = self.stream or self.trim is not None
        first = loop.time() + self.gw.deadlines.first_token if watches_tokens else self.deadline
        try:
            async with asyncio.timeout_at(min(first, self.deadline)) as t:
                self._timer = t
                await self._attempt(replica, payload, send)
        except TimeoutError:
            if not t.expired():
                raise
            which = "total" if t.when() >= self.deadline else "first-token"
            self.gw.metrics.upstream_errors.labels(replica.label, "timeout").inc()
            secs = self.gw.deadlines.total if which == "total" else self.gw.deadlines.first_token
            err = APIError(504, f"the engine did not finish within the {which} deadline ({secs:g}s)",
                           code="engine_timeout")
            if not self.started:
                raise Retry(err, retry=which == "first-token")
            if not self.finished:  # streaming already: end it in-band
                log.warning("request %s: engine %s missed the %s deadline mid-stream", self.rid, replica.label, which)
                await send({"type": "http.response.body", "body": error_event(err) + DONE + b"\n\n",
                            "more_body": False})
        finally:
            self._timer = None

    async def _attempt(self, replica: Replica, payload: bytes, send) -> None:
        gw = self.gw
        resp = await open_upstream(gw, replica, self.path, payload)
        try:
            if resp.status != 200:
                try:
                    raw = await read_capped(resp)
                except UPSTREAM_ERRORS:
                    raw = b""
                err = normalize_upstream_error(resp.status, raw)
                if resp.status >= 500:
                    gw.metrics.upstream_errors.labels(replica.label, f"http_{resp.status}").inc()
                error = APIError(resp.status, err["error"]["message"], param=err["error"]["param"],
                                 code=err["error"]["code"])
                raise Retry(error, retry=resp.status in RETRY_STATUSES)
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
        except UPSTREAM_ERRORS as e:
            kind, err = upstream_failure(e, "read")
            self.gw.metrics.upstream_errors.labels(replica.label, kind).inc()
            raise Retry(err, retry=kind != "protocol")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):  # relaying it as application/json would lie to the client
            self.gw.metrics.upstream_errors.labels(replica.label, "protocol").inc()
            raise Retry(APIError(502, "the engine answered 200 with a body that is not a JSON object",
                                 code="engine_protocol_error"), retry=False)
        choices = data.get("choices")
        self.account(data.get("usage"), choices if isinstance(choices, list) else [])
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": raw})

    def account(self, usage: Any, choices: list) -> None:
        """Token and finish metrics from what the engine reported; malformed values are not counted."""
        m = self.gw.metrics
        if isinstance(usage, dict):
            b = m.bound(self.model, self.endpoint)
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            p = p if type(p) is int and p > 0 else 0
            c = c if type(c) is int and c > 0 else 0
            if p:
                b.prompt_tokens.inc(p)
            if c:
                b.completion_tokens.inc(c)
            if self.key is not None:
                self.gw.key_limits.spend(self.key, p + c)
        for c in choices:
            if isinstance(c, dict) and isinstance(c.get("finish_reason"), str):
                m.finished.labels(self.model, c["finish_reason"][:32]).inc()

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
                            self.first_token_seen()
                        last_token_at = now
                        if b'"finish_reason":' in ev and FINISHED.search(ev):
                            self.account(None, _choices(ev))
                    elif kind is USAGE:
                        usage = load_event(ev).get("usage")
                        self.account(usage, [])
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
        except UPSTREAM_ERRORS as e:
            kind, failure = upstream_failure(e, "stream")
            m.upstream_errors.labels(replica.label, kind).inc()
            if not self.started:
                raise Retry(failure)
            log.warning("request %s: engine %s broke mid-stream: %s", self.rid, replica.label, failure.message)
        if not self.started:
            if not saw_done:  # closed before a single event: nothing reached the client, another may serve it
                m.upstream_errors.labels(replica.label, "stream").inc()
                raise Retry(APIError(502, "the engine closed the stream before sending anything",
                                     code="engine_error"))
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        tail = b""
        if not saw_done:  # the engine stopped without finishing: tell the client in-band, then end cleanly
            err = failure or stream_ended()
            tail = error_event(err) + DONE + b"\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def _choices(ev: bytes) -> list:
    choices = load_event(ev).get("choices")
    return choices if isinstance(choices, list) else []
