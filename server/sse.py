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


class EventSplitter:
    """Complete events from a byte stream fed in arbitrary chunks (stripped, empty ones dropped)."""
    __slots__ = ("rest",)

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.rest + chunk
        if b"\n\n" not in buf:
            self.rest = buf
            return []
        *events, self.rest = buf.split(b"\n\n")
        return [e for e in (ev.strip(b"\r\n") for ev in events) if e]
