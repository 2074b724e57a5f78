"""A deterministic fake of vLLM's OpenAI server, for unit tests and the gateway microbenchmark.

Pure ASGI so it sees client disconnects exactly (it records them). Behaviour per instance
(token_delay, first_token_delay, fail_status, health, gate) and per request through body fields
prefixed `fake_`: fake_token_delay, fake_first_token_delay, fake_break_after (drop the connection after
k tokens), fake_stall_after (send k tokens, then nothing until the client leaves), fake_wait_gate (hold
the second token until the test sets `gate`, so a test can order events without sleeping)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

from tests.support.asgi import lifespan, read_json, send_json, watch_disconnect

MODEL = "fake-model"


class FakeUpstream:
    def __init__(self, model: str = MODEL, token_delay: float = 0.0, first_token_delay: float = 0.0):
        self.model = model
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.fail_status: int | None = None  # answer every completion with this status
        self.healthy = True
        self.gate = threading.Event()  # set by a test: releases requests that wait for it (fake_wait_gate)
        self.gate_timed_out = 0  # requests that gave up waiting for the gate
        self.requests: list[dict] = []  # bodies received
        self.active = 0  # completions currently being served
        self.disconnects = 0  # completions whose client (the gateway) went away
        self.completed = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        path = scope["path"]
        if path == "/health":
            return await send_json(send, 200 if self.healthy else 503, {} if self.healthy else {"error": "down"})
        if path == "/v1/models":
            return await send_json(send, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}]})
        if path not in ("/v1/chat/completions", "/v1/completions"):
            return await send_json(send, 404, {"error": {"message": "no route", "type": "NotFound", "code": 404}})
        req = await read_json(receive)
        self.requests.append(req)
        status = req.get("fake_status") or self.fail_status
        if status:
            return await send_json(send, status, {"error": {"message": f"fake failure {status}",
                                                             "type": "BadRequestError", "param": None,
                                                             "code": status}})
        if req.get("model") != self.model:
            return await send_json(send, 404, {"error": {"message": f"The model `{req.get('model')}` does not exist.",
                                                          "type": "NotFoundError", "param": "model", "code": 404}})
        self.active += 1
        gone, watcher = watch_disconnect(receive)
        try:
            await self._complete(req, path == "/v1/chat/completions", send, gone)
        finally:
            watcher.cancel()
            self.active -= 1
            if gone.is_set():
                self.disconnects += 1
            else:
                self.completed += 1

    async def _sleep(self, seconds: float, gone: asyncio.Event) -> bool:
        """Sleep, waking early if the client leaves; True when the client is gone."""
        if seconds <= 0:
            await asyncio.sleep(0)
            return gone.is_set()
        try:
            await asyncio.wait_for(gone.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        return gone.is_set()

    async def _wait_gate(self, gone: asyncio.Event, timeout: float = 30.0) -> bool:
        """Until the test sets `gate` (True) or the client leaves (False). A threading.Event, set from the
        test's thread, so it is polled."""
        t0 = time.monotonic()
        while not self.gate.is_set():
            if gone.is_set():
                return False
            if time.monotonic() - t0 > timeout:
                self.gate_timed_out += 1
                return True
            await asyncio.sleep(0.005)
        return not gone.is_set()

    async def _complete(self, req: dict, chat: bool, send, gone: asyncio.Event) -> None:
        n_tokens = req.get("max_tokens") or req.get("max_completion_tokens") or 16
        delay = req.get("fake_token_delay", self.token_delay)
        first = req.get("fake_first_token_delay", self.first_token_delay)
        break_after = req.get("fake_break_after")  # drop the connection after k tokens
        stall_after = req.get("fake_stall_after")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-fake{len(self.requests)}"
        obj = "chat.completion" if chat else "text_completion"
        tokens = [f"tok{i} " for i in range(n_tokens)]
        usage = {"prompt_tokens": 7, "completion_tokens": n_tokens, "total_tokens": 7 + n_tokens}
        if await self._sleep(first, gone):
            return
        if not req.get("stream"):
            text = "".join(tokens)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})
            return await send_json(send, 200, {"id": rid, "object": obj, "created": int(time.time()),
                                                "model": self.model, "choices": [choice], "usage": usage})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        obj += ".chunk" if chat else ""
        for i, tok in enumerate(tokens):
            if i and await self._sleep(delay, gone):
                return
            if i == 1 and req.get("fake_wait_gate") and not await self._wait_gate(gone):
                return
            if stall_after is not None and i == stall_after:
                await gone.wait()
                return
            if break_after is not None and i == break_after:
                raise ConnectionAbortedError("fake upstream breaks the stream")  # uvicorn drops the connection
            last = i == n_tokens - 1
            if chat:
                delta = {"role": "assistant", "content": tok} if i == 0 else {"content": tok}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "length" if last else None}
            else:
                choice = {"index": 0, "text": tok, "logprobs": None, "finish_reason": "length" if last else None}
            chunk = {"id": rid, "object": obj, "created": 0, "model": self.model, "choices": [choice]}
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                        "more_body": True})
        tail = b""
        if (req.get("stream_options") or {}).get("include_usage"):
            chunk = {"id": rid, "object": obj, "created": 0, "model": self.model, "choices": [], "usage": usage}
            tail = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False})
