"""What the client of a trimmed request receives: SSE events, or (stream=false) one chat.completion
merged from the engine's chunks. Both take the same calls from TrimmedStream (server/trimming/stream.py)."""
from __future__ import annotations

import json
from typing import Any, Optional

from ..errors import APIError, error_body, normalize_upstream_error
from ..http_common import SSE_HEADERS, send_json
from ..sse import DONE, load_event


def event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class SSESink:
    """stream=true: events collected per engine read and sent as one body chunk."""

    def __init__(self, rr: Any, send):
        self.rr, self.send, self.out = rr, send, []

    def emit(self, obj: dict) -> None:
        self.out.append(event(obj))

    def raw(self, ev: bytes) -> None:
        self.out.append(ev)

    def usage(self, chunk: dict) -> None:
        if self.rr.client_wants_usage:
            self.emit(chunk)

    def error(self, err: APIError) -> None:
        self.raw(event(error_body(err.status, err.message, code=err.code)))

    async def _start(self) -> None:
        if not self.rr.started:
            await self.send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def flush(self) -> None:
        if self.out:
            await self._start()
            body, self.out = b"\n\n".join(self.out) + b"\n\n", []
            await self.send({"type": "http.response.body", "body": body, "more_body": True})

    async def finish(self) -> None:
        await self._start()
        body = (b"\n\n".join(self.out) + b"\n\n" if self.out else b"") + DONE + b"\n\n"
        self.out = []
        await self.send({"type": "http.response.body", "body": body, "more_body": False})


class CollectSink:
    """stream=false with trimming: the engine still streams; the chunks merge into one chat.completion."""

    def __init__(self, rr: Any, send):
        self.rr, self.send = rr, send
        self.head: dict = {}
        self.fields: dict[str, str] = {}  # content / reasoning text
        self.tool_calls: dict[int, dict] = {}
        self.logprobs: Optional[list] = None
        self.finish_reason = None
        self.extra: dict = {}  # e.g. stop_reason
        self.leanserve: Optional[dict] = None
        self.usage_: Optional[dict] = None
        self.failed: Optional[dict] = None

    def emit(self, obj: dict) -> None:
        if not self.head:
            self.head = {k: obj.get(k) for k in ("id", "created", "model")}
        if "leanserve" in obj:
            self.leanserve = obj["leanserve"]
        for c in obj.get("choices") or []:
            delta = c.get("delta") or {}
            for k, v in delta.items():
                if k == "tool_calls" and isinstance(v, list):
                    self._tool_calls(v)
                elif isinstance(v, str) and k != "role":
                    self.fields[k] = self.fields.get(k, "") + v
            lp = c.get("logprobs")
            if isinstance(lp, dict) and isinstance(lp.get("content"), list):
                self.logprobs = (self.logprobs or []) + lp["content"]
            if c.get("finish_reason"):
                self.finish_reason = c["finish_reason"]
                if "stop_reason" in c:
                    self.extra["stop_reason"] = c["stop_reason"]

    def _tool_calls(self, calls: list) -> None:
        for tc in calls:
            if not isinstance(tc, dict):
                continue
            cur = self.tool_calls.setdefault(tc.get("index", 0), {"function": {"arguments": ""}})
            for k in ("id", "type"):
                if tc.get(k):
                    cur[k] = tc[k]
            fn = tc.get("function") or {}
            if fn.get("name"):
                cur["function"]["name"] = fn["name"]
            cur["function"]["arguments"] += fn.get("arguments") or ""

    def raw(self, ev: bytes) -> None:
        data = load_event(ev)
        if "error" in data and self.failed is None:
            self.failed = data

    def usage(self, chunk: dict) -> None:
        self.usage_ = chunk.get("usage")

    def error(self, err: APIError) -> None:
        if self.failed is None:
            self.failed = error_body(err.status, err.message, code=err.code)

    async def flush(self) -> None:
        pass

    async def finish(self) -> None:
        if self.failed is not None:
            err = self.failed.get("error") or {}
            status = err.get("code") if isinstance(err.get("code"), int) and err["code"] >= 400 else 502
            body = normalize_upstream_error(status, json.dumps(self.failed).encode())
            return await send_json(self.send, status, body)
        msg: dict[str, Any] = {"role": "assistant", "content": self.fields.pop("content", None)}
        msg.update(self.fields)
        if self.tool_calls:
            msg["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        if msg["content"] is None and not self.tool_calls:
            msg["content"] = ""
        choice = {"index": 0, "message": msg, "logprobs": {"content": self.logprobs} if self.logprobs else None,
                  "finish_reason": self.finish_reason, **self.extra}
        body = {**self.head, "object": "chat.completion", "choices": [choice], "usage": self.usage_}
        if self.leanserve is not None:
            body["leanserve"] = self.leanserve
        await send_json(self.send, 200, body)
