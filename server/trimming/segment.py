"""Incremental splitting of a reasoning model's thinking text into thoughts.

A thought ends where the next one starts with a reflection marker ("Wait", "But", ...) at the
start of a paragraph, or where thinking ends. Feeding the text in one piece or in any chunking
gives the same thoughts: undecided text (a marker or tag cut by a delta boundary) is held back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MARKERS: tuple[str, ...] = (
    "Wait",
    "But",
    "Alternatively",
    "Hmm",
    "Hold on",
    "Let me double-check",
    "Let me double check",
    "Let me verify",
)


@dataclass(frozen=True)
class Delimiters:
    """Where thinking starts and ends in the model output.

    implicit_open: the output starts inside thinking (chat templates that open the think block in
    the prompt, or a relay feeding `reasoning_content`); a leading open tag is then skipped.
    """

    open: str = "<think>"
    close: tuple[str, ...] = ("</think>",)
    implicit_open: bool = False


THINK = Delimiters()
# Sky-T1 style; a solution tag without an end-of-thought tag also ends thinking.
SKY_T1 = Delimiters(
    open="<|begin_of_thought|>",
    close=("<|end_of_thought|>", "<|begin_of_solution|>"),
    implicit_open=True,
)


@dataclass(frozen=True)
class Thought:
    index: int
    text: str
    start: int  # char offsets in the whole fed stream; thoughts tile the thinking text
    end: int
    closed_by: str  # "marker" | "close" | "flush"


class Segmenter:
    """feed(delta) -> completed thoughts; flush() at end of stream."""

    def __init__(
        self,
        markers: tuple[str, ...] = DEFAULT_MARKERS,
        delimiters: Delimiters = THINK,
        min_chars: int = 0,
    ) -> None:
        self.delimiters = delimiters
        self.min_chars = min_chars
        alts = "|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True))
        closes = "|".join(re.escape(c) for c in delimiters.close)
        # A marker must stand as a word: the next char is needed and must not be a letter.
        self._pattern = re.compile(rf"(?P<close>{closes})|(?P<split>\n\n(?:{alts})(?=[^A-Za-z]))")
        # Longest text that can still turn out to be (part of) a match, lookahead char included.
        self._hold = max([len(c) for c in delimiters.close] + [2 + len(m) + 1 for m in markers])
        self.phase = "before"  # -> "thinking" -> "after"
        self.thinking_start: int | None = None
        self.thinking_end: int | None = None
        self.ended_by: str | None = None  # "close" (a tag) | "flush" (end of stream)
        self.consumed = 0  # chars fed so far
        self._buf = ""  # undecided text, starting at offset _buf_at
        self._buf_at = 0
        self._parts: list[str] = []  # decided text of the current thought
        self._thought_start = 0
        self._count = 0

    @property
    def holdback(self) -> int:
        """Chars a relay must hold back to never forward text past a marker cut point: a split
        is only known once the marker and the char after it have arrived."""
        return self._hold

    @property
    def thinking_chars(self) -> int:
        """Thinking text seen so far (all of it once thinking has ended)."""
        if self.thinking_start is None:
            return 0
        end = self.thinking_end if self.thinking_end is not None else self.consumed
        return end - self.thinking_start

    def feed(self, delta: str) -> list[Thought]:
        if not delta or self.phase == "after":
            self.consumed += len(delta)
            return []
        self.consumed += len(delta)
        self._buf += delta
        if self.phase == "before" and not self._find_open(final=False):
            return []
        return self._scan(final=False)

    def flush(self) -> list[Thought]:
        if self.phase == "before":
            if not self._find_open(final=True):
                return []
        if self.phase != "thinking":
            return []
        out = self._scan(final=True)
        if self.phase != "thinking":  # a close tag was in the held-back text
            return out
        self.thinking_end = self.consumed
        self.ended_by = "flush"
        self.phase = "after"
        text = "".join(self._parts)
        if text.strip():
            out.append(self._emit(self.consumed, "flush"))
        return out

    def _find_open(self, final: bool) -> bool:
        """Look for the start of thinking; True once inside it."""
        open_tag = self.delimiters.open
        if self.delimiters.implicit_open:
            lead = len(self._buf) - len(self._buf.lstrip())
            rest = self._buf[lead:]
            if rest.startswith(open_tag):
                self._enter(lead + len(open_tag))
            elif open_tag.startswith(rest) and not final:
                return False  # could still become the open tag
            else:
                self._enter(0)
            return True
        i = self._buf.find(open_tag)
        if i >= 0:
            self._enter(i + len(open_tag))
            return True
        keep = 0 if final else len(open_tag) - 1
        drop = max(0, len(self._buf) - keep)
        self._buf_at += drop
        self._buf = self._buf[drop:]
        return False

    def _enter(self, i: int) -> None:
        self.phase = "thinking"
        self._buf_at += i
        self._buf = self._buf[i:]
        self.thinking_start = self._thought_start = self._buf_at

    def _scan(self, final: bool) -> list[Thought]:
        out: list[Thought] = []
        buf, at = self._buf, self._buf_at
        done = 0  # buf[:done] is already in self._parts
        last_end = 0
        for m in self._pattern.finditer(buf):
            last_end = m.end()
            if m.group("close") is not None:
                self._parts.append(buf[done : m.start()])
                self.thinking_end = at + m.start()
                self.ended_by = "close"
                self.phase = "after"
                self._buf, self._buf_at = "", at + len(buf)
                text = "".join(self._parts)
                if text.strip():
                    out.append(self._emit(at + m.start(), "close"))
                return out
            split_at = at + m.start()
            self._parts.append(buf[done : m.start()])
            done = m.start()
            size = split_at - self._thought_start
            if size >= max(1, self.min_chars) and "".join(self._parts).strip():
                out.append(self._emit(split_at, "marker"))
        keep_from = len(buf) if final else max(last_end, len(buf) - self._hold + 1, done)
        self._parts.append(buf[done:keep_from])
        self._buf, self._buf_at = buf[keep_from:], at + keep_from
        return out

    def _emit(self, end: int, closed_by: str) -> Thought:
        text = "".join(self._parts)
        t = Thought(self._count, text, self._thought_start, end, closed_by)
        self._count += 1
        self._parts = []
        self._thought_start = end
        return t
