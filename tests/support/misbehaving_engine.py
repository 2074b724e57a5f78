"""An engine that breaks HTTP and SSE in the ways real engines and proxies do, on raw sockets (a real
HTTP server would refuse to send most of this). Health and /v1/models answer normally unless
`models` says otherwise; completions answer according to `mode`:

stall_before_headers  read the request, then send nothing until the client leaves
stall_after_headers   200 + SSE headers, then nothing
stall_mid_stream      two token events, then nothing
garbage               bytes that are not HTTP, then close
huge_header           a 200 whose header is 100 KB
non_json_200          200 application/json with an HTML body
html_502              502 text/html (a proxy's error page)
gzip                  the normal answer, gzip-compressed (content-encoding: gzip)
crlf_sse              the normal stream, events framed with CRLF CRLF
close_mid_stream      two token events, then the connection closes (no chunked terminator)
close_before_events   SSE headers, then the connection closes
close_before_headers  read the request, then close without answering
string_usage          the normal answer with usage.prompt_tokens as a string
huge_event            one event that never ends (2 MB without a separator)
ok                    the normal answer

`closed` counts completions whose client (the gateway) closed the connection while the engine held it."""
from __future__ import annotations

import asyncio
import gzip
import json
import threading

from tests.support.fake_upstream import MODEL

TOKENS = ["tok0 ", "tok1 ", "tok2 "]


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(obj: dict, sep: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(obj).encode() + sep


def _stream_events(chat: bool, sep: bytes = b"\n\n", usage: dict | None = None) -> list[bytes]:
    out = []
    for i, tok in enumerate(TOKENS):
        last = i == len(TOKENS) - 1
        if chat:
            choice = {"index": 0, "delta": {"content": tok}, "finish_reason": "length" if last else None}
        else:
            choice = {"index": 0, "text": tok, "finish_reason": "length" if last else None}
        out.append(_event({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
                           "choices": [choice]}, sep))
    out.append(_event({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL, "choices": [],
                       "usage": usage or {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}, sep))
    out.append(b"data: [DONE]" + sep)
    return out


def _json_answer(chat: bool, usage: dict | None = None) -> dict:
    text = "".join(TOKENS)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
              if chat else {"index": 0, "text": text, "finish_reason": "length"})
    return {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0, "model": MODEL,
            "choices": [choice], "usage": usage or {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def _response(status: int, reason: str, headers: dict, body: bytes = b"") -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


SSE_HEAD = _response(200, "OK", {"content-type": "text/event-stream", "transfer-encoding": "chunked"})


class MisbehavingEngine:
    def __init__(self, mode: str = "ok", models: object = None):
        self.mode = mode
        self.models = models  # the /v1/models answer; None = a normal one
        self.requests: list[dict] = []
        self.headers: list[dict] = []  # request headers of each completion (lower-case names)
        self.closed = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> "MisbehavingEngine":
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._conn, "127.0.0.1", 0), self._loop)
        self._server = fut.result(10)
        self.url = "http://127.0.0.1:%d" % self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close():
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *hdrs = head.decode("latin-1").split("\r\n")
                path = line.split(" ")[1]
                length = 0
                for h in hdrs:
                    if h.lower().startswith("content-length:"):
                        length = int(h.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                if "completions" in path:
                    self.headers.append({k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in hdrs if h)})
                if not await self._answer(path, body, reader, writer):
                    return
        finally:
            writer.close()

    async def _wait_close(self, reader: asyncio.StreamReader) -> None:
        """Hold the connection until the client closes it (counted)."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.closed += 1

    async def _answer(self, path: str, body: bytes, reader, writer) -> bool:
        """Answer one request; True to keep the connection for another."""
        if path == "/health":
            writer.write(_response(200, "OK", {"content-length": "0"}))
            return True
        if path == "/v1/models":
            payload = self.models if self.models is not None else {
                "object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]}
            raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            writer.write(_response(200, "OK", {"content-type": "application/json", "content-length": len(raw)}, raw))
            return True
        req = json.loads(body)
        self.requests.append(req)
        chat, stream, mode = path.endswith("/chat/completions"), bool(req.get("stream")), self.mode
        if mode == "close_before_headers":
            return False
        if mode == "stall_before_headers":
            await self._wait_close(reader)
            return False
        if mode in ("stall_after_headers", "stall_mid_stream", "close_mid_stream", "close_before_events"):
            writer.write(SSE_HEAD)
            if mode in ("stall_mid_stream", "close_mid_stream"):
                writer.write(b"".join(_chunk(e) for e in _stream_events(chat)[:2]))
            await writer.drain()
            if mode.startswith("close"):
                return False
            await self._wait_close(reader)
            return False
        if mode == "garbage":
            writer.write(b"\x00\x01\x02 this is not HTTP \xff\xfe\r\n\r\n")
            return False
        if mode == "huge_header":
            writer.write(_response(200, "OK", {"content-type": "application/json", "x-big": "a" * 100_000,
                                               "content-length": "2"}, b"{}"))
            return False
        if mode == "non_json_200":
            raw = b"<html><body>upstream says hi</body></html>"
            writer.write(_response(200, "OK", {"content-type": "application/json", "content-length": len(raw)}, raw))
            return True
        if mode == "html_502":
            raw = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
            writer.write(_response(502, "Bad Gateway", {"content-type": "text/html", "content-length": len(raw)}, raw))
            return True
        if mode == "huge_event":
            writer.write(SSE_HEAD + _chunk(b"data: {\"x\": \"" + b"a" * 2_000_000))
            await writer.drain()
            await self._wait_close(reader)
            return False
        usage = {"prompt_tokens": "7", "completion_tokens": 3, "total_tokens": 10} if mode == "string_usage" else None
        sep = b"\r\n\r\n" if mode == "crlf_sse" else b"\n\n"
        if stream:
            data = b"".join(_stream_events(chat, sep, usage))
            hdrs = {"content-type": "text/event-stream"}
        else:
            data = json.dumps(_json_answer(chat, usage)).encode()
            hdrs = {"content-type": "application/json"}
        if mode == "gzip":
            data = gzip.compress(data)
            hdrs["content-encoding"] = "gzip"
        hdrs["content-length"] = len(data)
        writer.write(_response(200, "OK", hdrs, data))
        return True
