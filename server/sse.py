"""Server-sent events from the engine: split the byte stream into events and classify them without a
JSON parse per token (the relays' hot path)."""
from __future__ import annotations

import json
import re

DONE = b"data: [DONE]"
TOKEN, USAGE, DONE_EVENT, OTHER = "token", "usage", "done", "other"
HAS_CHOICE = re.compile(rb'"choices": ?\[\{')
EMPTY_CHOICES = re.compile(rb'"choices": ?\[\]')
FINISHED = re.compile(rb'"finish_reason": ?"')


def classify(ev: bytes) -> str:
    if ev == DONE:
        return DONE_EVENT
    if not ev.startswith(b"data:"):
        return OTHER
    if HAS_CHOICE.search(ev):
        return TOKEN
    if b'"usage"' in ev and EMPTY_CHOICES.search(ev):
        return USAGE
    return OTHER


def load_event(ev: bytes) -> dict:
    try:
        data = json.loads(ev[5:])
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class SSEError(ValueError):
    """The engine's event stream is malformed (an event larger than the splitter's limit)."""


MAX_EVENT_BYTES = 1 << 20  # an unfinished event beyond this is a broken engine, not a big token


class EventSplitter:
    """Complete events from a byte stream fed in arbitrary chunks (stripped, empty ones dropped).
    Any SSE line ending (LF, CRLF, CR) frames events. An unfinished event is kept as a list of pieces,
    joined once when its end arrives (no re-join per chunk), and bounded by `limit` bytes."""
    __slots__ = ("parts", "size", "cr", "limit")

    def __init__(self, limit: int = MAX_EVENT_BYTES) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.cr = False  # the previous chunk ended with CR: a LF opening this one belongs to it
        self.limit = limit

    @property
    def rest(self) -> bytes:
        return b"".join(self.parts)

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.cr or b"\r" in chunk:
            if self.cr and chunk[:1] == b"\n":
                chunk = chunk[1:]
            self.cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        parts = self.parts
        if b"\n\n" not in chunk and not (parts and chunk[:1] == b"\n" and parts[-1][-1:] == b"\n"):
            if chunk:
                parts.append(chunk)
                self.size += len(chunk)
                if self.size > self.limit:
                    raise SSEError(f"the engine sent an event larger than {self.limit} bytes")
            return []
        buf = b"".join(parts) + chunk if parts else chunk
        *events, rest = buf.split(b"\n\n")
        self.parts, self.size = ([rest], len(rest)) if rest else ([], 0)
        if self.size > self.limit:
            raise SSEError(f"the engine sent an event larger than {self.limit} bytes")
        return [e for e in (ev.strip(b"\r\n") for ev in events) if e]
