"""Thought trimming in the relay: watch a chat stream's thinking, cut it, make the model answer.

One request with trimming on (the `trim` knob, or the server default) is served like this:

1. The first engine call streams as usual (always stream=true, with usage on every chunk so the
   tokens generated are known exactly at any moment). Each event is relayed at once; its text
   deltas also go into a queue that a background task feeds to a ThoughtTrimmer (segmenter +
   verifier + policy). A slow verifier therefore never delays the relay: it only makes the cut
   come later. Inside the thinking, the relay holds back the last `Segmenter.holdback` characters
   (those the segmenter has not decided yet), so with a prompt verifier the client never sees the
   start of the thought ("\\n\\nWait") that the cut removes. Content deltas are re-serialised for
   that; only trimmed requests pay for it.
2. On a cut (overthinking / repetition / max_thoughts from the trimmer; thinking_budget checked by
   the relay itself on the engine's token counts) the first response is closed, which makes vLLM
   abort it. The client gets one synthetic chunk: the kept thinking it has not seen yet + a short
   closing phrase + the closing tag, carrying the marker
   `"leanserve": {"trim": {"reason", "thoughts", "thinking_tokens", "thinking_tokens_saved_estimate"}}`
   (the first chunk after the cut; non-streaming responses carry it at the top level).
   The kept thinking is what the trimmer chose, or more if the relay had already sent more
   (a late verifier): the engine always continues from exactly what the client saw.
3. The continuation: the same body with the assistant message "thinking so far + closing phrase +
   </think>" (continue_final_message=true, add_generation_prompt=false; prefix caching makes its
   prefill cheap), max_tokens reduced by the tokens already generated, on the same replica. Its
   chunks are relayed as the same stream: id/created/model of the first call, choice index 0, no
   second role delta; the usage chunk (when the client asked) sums both calls.

Thinking is `<think>…</think>` in the content (the assistant prefill of a continue_final_message
request counts as the start of the output), or vLLM's separate `reasoning` (`reasoning_content`)
field when a reasoning parser is on; in that case the continuation's prefill is the thinking
wrapped in the tags, and whatever the continuation streams is relayed as content.
A verifier decision that arrives after the thinking has ended is ignored: the model is answering.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Protocol, Sequence

import aiohttp

from ..errors import APIError, normalize_upstream_error
from ..http_common import UPSTREAM_ERRORS, Retry, open_upstream, read_capped, stream_ended, upstream_failure
from ..schema import engine_body
from ..sse import DONE_EVENT, TOKEN, USAGE, EventSplitter, classify, load_event
from .policy import Decision, ThoughtTrimmer, TrimConfig, estimate_tokens
from .rule_verifier import RuleVerifier, Verifier
from .segment import THINK, Delimiters
from .sinks import CollectSink, SSESink

log = logging.getLogger("leanserve.trimming.stream")

CLOSING_PHRASE = "Okay, I think I have finished thinking."
REASONING_FIELDS = ("reasoning", "reasoning_content")
_RULE = RuleVerifier()


class RelayedRequest(Protocol):
    """What the trimmed relay uses of the request it serves (server/relay.py's RelayResponse)."""
    gw: Any  # the Gateway: pool, client, metrics
    body: dict
    model: str
    path: str
    endpoint: str
    stream: bool
    client_wants_usage: bool
    started: bool  # response headers sent
    arrival: float
    rid: str

    def account(self, usage: Any, choices: list) -> None: ...  # token and finish metrics (and key budgets)

    def first_token_seen(self) -> None: ...  # the first-token deadline is met


# ---- per-gateway service and per-request plan ---------------------------------------------------
class TrimService:
    """Trimming settings of one gateway and its verifiers (one ModelVerifier per endpoint and model,
    so questions from all streams batch together)."""

    def __init__(self, default: bool = False, verifier_url: str = "", verifier_model: str = "",
                 verifier_timeout: float = 10.0, closing_phrase: str = CLOSING_PHRASE,
                 delimiters: Delimiters = THINK):
        self.default = default
        self.verifier_url = verifier_url.rstrip("/")
        self.verifier_model = verifier_model
        self.verifier_timeout = verifier_timeout
        self.closing_phrase = closing_phrase
        self.delimiters = delimiters
        self._model_verifiers: dict[tuple[str, str], Verifier] = {}

    @classmethod
    def from_settings(cls, s: Any) -> "TrimService":
        return cls(default=s.trim_default, verifier_url=s.trim_verifier_url, verifier_model=s.trim_verifier_model,
                   verifier_timeout=s.trim_verifier_timeout)

    def verifier(self, kind: str, client: aiohttp.ClientSession, engine_url: str, model: str) -> Verifier:
        if kind != "model":
            return _RULE
        from .model_verifier import ModelVerifier

        key = (self.verifier_url or engine_url, self.verifier_model or model)
        v = self._model_verifiers.get(key)
        if v is None:
            v = self._model_verifiers[key] = ModelVerifier(client, key[0], key[1], timeout=self.verifier_timeout)
        return v


_NO_SERVICE = TrimService()


def plan_trim(gw: Any, trim: Optional[TrimConfig], body: dict, endpoint: str) -> Optional["TrimPlan"]:
    """The trimming plan of a request, or None for the plain relay. `trim`: the request's own settings as
    parse_body validated them (it refuses, with 400, an enabled `trim` where it cannot apply), None when
    it has none; the server default applies only where it can."""
    svc: TrimService = getattr(gw, "trim", None) or _NO_SERVICE
    if trim is not None:
        return TrimPlan(svc, trim) if trim.enabled else None
    if not svc.default or endpoint != "chat" or (body.get("n") or 1) != 1:
        return None
    return TrimPlan(svc, TrimConfig())


def _question(messages: Any) -> Optional[str]:
    """The last user message's text: what the verifier is told the problem is."""
    for m in reversed(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                c = "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
            return c if isinstance(c, str) else None
    return None


def _prefill(body: dict) -> Optional[str]:
    """The assistant prefill the output continues (continue_final_message), if any."""
    msgs = body.get("messages")
    if not body.get("continue_final_message") or not isinstance(msgs, list) or not msgs:
        return None
    last = msgs[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return None
    c = last.get("content")
    if isinstance(c, list):
        c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    return c if isinstance(c, str) else None


@dataclass
class TrimPlan:
    service: TrimService
    config: TrimConfig  # the request's settings; delimiters are the service's

    def trimmer_config(self, implicit_open: bool) -> TrimConfig:
        d = self.service.delimiters
        return replace(self.config, delimiters=Delimiters(d.open, d.close, implicit_open or d.implicit_open))

    def upstream_body(self, body: dict) -> bytes:
        """The first engine call: always streamed, with usage on every chunk."""
        b = dict(engine_body(body))
        b["stream"] = True
        b["stream_options"] = {**(b.get("stream_options") or {}), "include_usage": True,
                               "continuous_usage_stats": True}
        return json.dumps(b).encode()

    async def relay(self, rr: RelayedRequest, resp: aiohttp.ClientResponse, replica: Any, send) -> None:
        await TrimmedStream(self, rr, replica, send).run(resp)


# ---- a verifier that reports its latency --------------------------------------------------------
class _Timed(Verifier):
    def __init__(self, inner: Verifier, hist: Any):
        self.inner, self.hist = inner, hist

    async def answers(self, thoughts: Sequence[str], question: Optional[str] = None) -> list[Optional[str]]:
        t0 = time.perf_counter()
        out = await self.inner.answers(thoughts, question)
        self.hist.observe(time.perf_counter() - t0)
        return out

    async def agreements(self, pairs: Sequence[tuple[str, str]], question: Optional[str] = None) -> list[bool]:
        t0 = time.perf_counter()
        out = await self.inner.agreements(pairs, question)
        self.hist.observe(time.perf_counter() - t0)
        return out


def _usage_counts(u: Any) -> tuple[int, int]:
    if not isinstance(u, dict):
        return 0, 0
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    return (p if type(p) is int else 0), (c if type(c) is int else 0)


@dataclass
class _Cut:
    reason: str
    keep_at: int  # offset in the thinking channel's text: keep text[:keep_at]
    thoughts: int
    marker: dict = field(default_factory=dict)


# ---- one trimmed request --------------------------------------------------------------------------
class TrimmedStream:
    def __init__(self, plan: TrimPlan, rr: RelayedRequest, replica: Any, send):
        self.plan, self.rr, self.replica = plan, rr, replica
        self.gw = rr.gw
        self.model = rr.model
        self.config = plan.config
        self.delims = plan.service.delimiters
        self.sink = SSESink(rr, send) if rr.stream else CollectSink(rr, send)
        opts = rr.body.get("stream_options") or {}
        self.client_continuous = rr.stream and rr.client_wants_usage and bool(opts.get("continuous_usage_stats"))
        b = self.gw.metrics.bound(self.model, rr.endpoint)
        self.ttft, self.itl = b.ttft, b.itl
        self.last_token_at = 0.0
        # the first call's identity, which the whole stream keeps
        self.head: Optional[dict] = None
        # token accounting of the first call (continuous usage; counted chunks if the engine has none)
        self.p1 = self.c1 = 0
        self.saw_usage = False
        self.usage1: Optional[dict] = None  # the first call's usage chunk (when it ran to the end)
        self.thinking_tokens = 0
        # the channel that carries thinking: "content" (tags) or a reasoning field
        self.prefix = _prefill(rr.body)
        self.mode: Optional[str] = "content" if self.prefix is not None else None
        self.reasoning_field = "reasoning"
        self.parts: list[str] = []  # all of that channel's text, prefill included
        self.total = 0  # chars in parts
        self.sent = 0  # chars of it the client has (the prefill counts as sent)
        self.held = ""  # text[sent:total]
        self.tail = ""  # last chars before the newest delta, for tags cut by delta boundaries
        self.phase = "before"  # -> "thinking" -> "after"
        self.think_start = 0
        self.ended = False  # the first call finished (a finish_reason arrived)
        self.saw_done = False
        # the trimmer, in its own task
        self.trimmer: Optional[ThoughtTrimmer] = None
        self.hold = 0
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.task: Optional[asyncio.Task] = None
        self.cut_future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.cut: Optional[_Cut] = None
        self.cut_considered = False

    # ---- entry --------------------------------------------------------------------------------
    async def run(self, resp: aiohttp.ClientResponse) -> None:
        m = self.gw.metrics
        try:
            if self.prefix is not None:
                self._start_trimmer(implicit_open=False)
                self.parts.append(self.prefix)
                self.total = self.sent = len(self.prefix)
                self._scan(self.prefix)
                self.queue.put_nowait(self.prefix)
            await self._first(resp)
            if self.cut is not None:
                resp.close()  # vLLM aborts the first request
                await self._emit_cut()
                await self._continue()
            await self.sink.finish()
        finally:
            self._stop_trimmer()
            if self.thinking_tokens:
                m.trim_thinking_tokens.labels(self.model).inc(self.thinking_tokens)

    # ---- the trimmer task ---------------------------------------------------------------------
    def _start_trimmer(self, implicit_open: bool) -> None:
        kind = self.config.verifier
        inner = self.plan.service.verifier(kind, self.gw.client, self.replica.url, self.model)
        verifier = _Timed(inner, self.gw.metrics.trim_verifier_seconds.labels(kind))
        question = _question(self.rr.body.get("messages"))
        # The relay counts real tokens and applies the budget itself (at the exact chunk): no estimates.
        self.trimmer = ThoughtTrimmer(self.plan.trimmer_config(implicit_open), verifier, question,
                                      estimate_budget=False)
        self.hold = self.trimmer.segmenter.holdback
        self.task = asyncio.ensure_future(self._trim_loop())

    def _stop_trimmer(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _trim_loop(self) -> None:
        assert self.trimmer is not None
        try:
            while True:
                texts = [await self.queue.get()]
                while not self.queue.empty():  # a slow verifier: judge what piled up in one batch
                    texts.append(self.queue.get_nowait())
                d = await self.trimmer.feed("".join(texts))
                if d.cut:
                    if not self.cut_future.done():
                        self.cut_future.set_result(d)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug or a verifier failure must not break the request: stop trimming
            log.exception("thought trimming failed; relaying the rest untrimmed")

    # ---- first call ---------------------------------------------------------------------------
    async def _first(self, resp: aiohttp.ClientResponse) -> None:
        splitter, failure = EventSplitter(), None
        try:
            while True:
                if self.cut_future.done() and not self.cut_considered:  # decided while the engine was quiet
                    self._cut_from(self.cut_future.result())
                    if self.cut is not None:
                        return
                reader = asyncio.ensure_future(resp.content.readany())
                waits = {reader} if self.cut_considered else {reader, self.cut_future}
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not reader.done():
                        reader.cancel()
                if not reader.done() or reader.cancelled():
                    continue
                chunk = reader.result()
                if not chunk:
                    break
                events = splitter.feed(chunk)
                if not events:
                    continue
                now = time.perf_counter()
                for ev in events:
                    kind = classify(ev)
                    if kind is TOKEN:
                        await self._first_token(ev, now)
                        if self.cut is not None:
                            return
                    elif kind is USAGE:
                        self.usage1 = load_event(ev)
                    elif kind is DONE_EVENT:
                        self.saw_done = True
                    else:
                        self.sink.raw(ev)
                await self.sink.flush()
        except UPSTREAM_ERRORS as e:
            kind, failure = upstream_failure(e, "stream")
            self.gw.metrics.upstream_errors.labels(self.replica.label, kind).inc()
            if not self.rr.started:  # nothing reached the client yet (never, for stream=false): retry
                raise Retry(failure)
            log.warning("request %s: engine %s broke mid-stream: %s", self.rr.rid, self.replica.label,
                        failure.message)
        # the first call ended without a cut
        self._stop_trimmer()
        if self.held:  # the stream broke off inside the thinking: what was held back is not cut
            channel = "content" if self.mode == "content" else self.reasoning_field
            self.sink.emit({**self._head(), "choices": [{"index": 0, "delta": {channel: self.held}, "logprobs": None,
                                                          "finish_reason": None}]})
            self.sent, self.held = self.total, ""
        if self.usage1 is not None:
            self.rr.account(self.usage1.get("usage"), [])
            self.sink.usage(self.usage1)
        if not self.saw_done:
            self.sink.error(failure or stream_ended())

    async def _first_token(self, ev: bytes, now: float) -> None:
        data = load_event(ev)
        if self.head is None:
            self.head = {"id": data.get("id"), "object": data.get("object") or "chat.completion.chunk",
                         "created": data.get("created"), "model": data.get("model")}
            self.rr.first_token_seen()
        if self.rr.stream:
            if self.last_token_at:
                self.itl.observe(now - self.last_token_at)
            else:
                self.ttft.observe(now - self.rr.arrival)
            self.last_token_at = now
        u = data.get("usage")
        if not self.client_continuous:
            data.pop("usage", None)
        choices = data.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        if not isinstance(choice.get("delta"), dict):
            choice["delta"] = {}
        delta = choice["delta"]
        content = delta.get("content")
        reasoning = None
        for f in REASONING_FIELDS:
            if delta.get(f):
                reasoning, self.reasoning_field = delta[f], f
        if isinstance(u, dict):
            self.saw_usage = True
            self.p1, c = _usage_counts(u)
            tokens, self.c1 = max(0, c - self.c1), c
        else:
            tokens = 1 if (content or reasoning) else 0
            self.c1 += tokens
        if self.mode is None and (reasoning or content):
            self.mode = "reasoning" if reasoning else "content"
            self._start_trimmer(implicit_open=self.mode == "reasoning")
            if self.mode == "reasoning":
                self.phase, self.think_start = "thinking", 0
        finished = bool(choice.get("finish_reason"))
        if finished:
            self.ended = True
            self.rr.account(None, [choice])
        if self.mode is None or self.phase == "after" and not self.held:
            self.sink.emit(data)  # nothing to watch (no text yet, or thinking is over)
            return
        channel = "content" if self.mode == "content" else self.reasoning_field
        text = content if self.mode == "content" else reasoning
        was_thinking = self.phase == "thinking"
        if self.mode == "reasoning" and content:
            self._end_thinking()
        if text:
            self.parts.append(text)
            self.total += len(text)
            self.held += text
            if self.mode == "content":
                self._scan(text)
            if self.phase != "after" and self.task is not None and not self.task.done():
                self.queue.put_nowait(text)
        if was_thinking or self.phase == "thinking":
            self.thinking_tokens += tokens
        if self.phase == "thinking" and not finished:
            await asyncio.sleep(0)  # a prompt verifier decides before the text is released
            if self.cut_future.done():
                self._cut_from(self.cut_future.result())
            elif self.trimmer is not None and self.trimmer.state.observe_budget(self.thinking_tokens, None).cut:
                self._cut_budget()
            if self.cut is not None:
                return
        upto = self.total if (finished or self.phase != "thinking") else max(self.sent, self.total - self.hold)
        out, self.held = self.held[: upto - self.sent], self.held[upto - self.sent:]
        self.sent = upto
        if text is not None or out:
            delta[channel] = out
        if self.mode == "reasoning" and channel != "content" and not out:
            delta.pop(channel, None)
        if out or finished or _meaningful(data, choice, delta, channel):
            self.sink.emit(data)

    def _scan(self, text: str) -> None:
        """Phase changes of the content channel: the open tag, then a close tag."""
        d = self.delims
        window = self.tail + text
        base = self.total - len(window)
        start = 0
        if self.phase == "before":
            i = window.find(d.open)
            if i >= 0:
                self.phase = "thinking"
                self.think_start = base + i + len(d.open)
                start = i + len(d.open)
        if self.phase == "thinking":
            for c in d.close:
                if window.find(c, start) >= 0:
                    self._end_thinking()
                    break
        keep = max([len(d.open)] + [len(c) for c in d.close]) - 1
        self.tail = window[-keep:] if keep else ""

    def _end_thinking(self) -> None:
        self.phase = "after"
        self._stop_trimmer()

    # ---- the cut ------------------------------------------------------------------------------
    def _cut_from(self, d: Decision) -> None:
        self.cut_considered = True  # a decision the relay ignores (thinking is over) stays ignored
        if self.phase != "thinking" or self.ended or self.cut is not None:
            return
        text = "".join(self.parts)
        k = max(self.sent, d.keep_upto if d.keep_upto is not None else self.total)
        k = max(self.sent, self.think_start, len(text[:k].rstrip()))
        self._set_cut(d.reason or "overthinking", k, self.trimmer.state.thoughts if self.trimmer else 0)

    def _cut_budget(self) -> None:
        text = "".join(self.parts)
        k = self.total
        # Not sent yet: drop a new paragraph that is (the start of) a reflection marker ("\n\nWai").
        unsent = text[self.sent:k]
        i = unsent.rfind("\n\n")
        if i >= 0:
            rest = unsent[i + 2:].lstrip()
            if any(m.startswith(rest) or rest.startswith(m) for m in self.trimmer.config.markers):
                k = self.sent + i
        k = max(self.sent, self.think_start, len(text[:k].rstrip()))
        self._set_cut("thinking_budget", k, self.trimmer.state.thoughts if self.trimmer else 0)

    def _set_cut(self, reason: str, keep_at: int, thoughts: int) -> None:
        budget = self.config.thinking_budget or self._max_tokens() or self._context_left()
        saved = max(0, budget - self.thinking_tokens) if budget else 0
        marker = {"trim": {"reason": reason, "thoughts": thoughts, "thinking_tokens": self.thinking_tokens,
                           "thinking_tokens_saved_estimate": saved}}
        self.cut = _Cut(reason, keep_at, thoughts, marker)
        self._stop_trimmer()
        m = self.gw.metrics
        m.trims.labels(self.model, reason).inc()
        if saved:
            m.trim_tokens_saved.labels(self.model).inc(saved)

    def _max_tokens(self) -> Optional[int]:
        b = self.rr.body
        vals = [v for v in (b.get("max_tokens"), b.get("max_completion_tokens")) if isinstance(v, int)]
        return min(vals) if vals else None

    def _context_left(self) -> Optional[int]:
        for m in getattr(self.replica, "models", None) or []:
            if m.get("id") == self.model and isinstance(m.get("max_model_len"), int):
                return max(0, m["max_model_len"] - self.p1)
        return None

    def _closing(self, kept: str) -> str:
        lead = "" if kept.endswith("\n\n") else "\n" if kept.endswith("\n") else "\n\n"
        return lead + self.plan.service.closing_phrase + "\n"

    async def _emit_cut(self) -> None:
        assert self.cut is not None
        text = "".join(self.parts)
        kept = text[: self.cut.keep_at]
        closing = self._closing(kept)
        unseen = kept[self.sent:] + closing
        if self.mode == "content":
            unseen += self.delims.close[0]
            delta = {"content": unseen}
        else:
            delta = {self.reasoning_field: unseen}
        self.sent, self.held = self.cut.keep_at, ""
        self.sink.emit({**self._head(), "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                      "finish_reason": None}],
                        "leanserve": self.cut.marker})
        await self.sink.flush()
        if self.mode == "content":
            self.assistant_text = kept + closing + self.delims.close[0]
        else:
            self.assistant_text = (self.prefix or "") + self.delims.open + "\n" + kept + closing + self.delims.close[0]

    def _head(self) -> dict:
        h = self.head or {}
        return {"id": h.get("id"), "object": h.get("object") or "chat.completion.chunk",
                "created": h.get("created"), "model": h.get("model")}

    def _usage_chunk(self, usage: dict) -> dict:
        return {**self._head(), "choices": [], "usage": usage}

    # ---- the continuation ---------------------------------------------------------------------
    def _continuation_body(self) -> bytes:
        body = dict(engine_body(self.rr.body))
        msgs = list(body.get("messages") or [])
        if self.prefix is not None:
            msgs = msgs[:-1]
        body["messages"] = msgs + [{"role": "assistant", "content": self.assistant_text}]
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
        body["stream"] = True
        body["stream_options"] = {"include_usage": True, **({"continuous_usage_stats": True}
                                                             if self.client_continuous else {})}
        body.pop("echo", None)
        for k in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(k), int):
                body[k] = max(1, body[k] - self.c1)
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = max(0, body["min_tokens"] - self.c1)
        return json.dumps(body).encode()

    async def _continue(self) -> None:
        gw, payload = self.gw, self._continuation_body()
        replica, tried, acquired = self.replica, {self.replica}, None
        resp = None
        try:
            while True:
                try:
                    resp = await open_upstream(gw, replica, self.rr.path, payload)
                    break
                except Retry as r:
                    if acquired is not None:
                        gw.pool.release(acquired)
                        acquired = None
                    try:
                        replica = gw.pool.pick(self.model, exclude=tried)
                    except APIError:
                        return self._fail(APIError(502, f"the engine did not take the trimmed continuation: "
                                                        f"{r.error.message}", code="engine_error"))
                    tried.add(replica)
                    gw.pool.acquire(replica)
                    acquired = replica
            if resp.status != 200:
                try:
                    raw = await read_capped(resp)
                except UPSTREAM_ERRORS:
                    raw = b""
                err = normalize_upstream_error(resp.status, raw)["error"]
                code = err.get("code") if isinstance(err.get("code"), str) else "engine_error"
                msg = f"trimmed continuation failed: {err.get('message')}"
                return self._fail(APIError(resp.status, msg, code=code))
            await self._relay_continuation(resp, replica)
        finally:
            if resp is not None:
                resp.release() if resp.content.at_eof() else resp.close()
            if acquired is not None:
                gw.pool.release(acquired)

    def _fail(self, err: APIError) -> None:
        log.warning("request %s: trimmed continuation failed: %s", self.rr.rid, err.message)
        self.rr.account({"prompt_tokens": self.p1, "completion_tokens": self.c1}, [])
        self.sink.error(err)

    async def _relay_continuation(self, resp: aiohttp.ClientResponse, replica: Any) -> None:
        splitter, done, usage2 = EventSplitter(), False, None
        try:
            async for chunk in resp.content.iter_any():
                events = splitter.feed(chunk)
                if not events:
                    continue
                now = time.perf_counter()
                for ev in events:
                    kind = classify(ev)
                    if kind is TOKEN and self.rr.stream:
                        if self.last_token_at:
                            self.itl.observe(now - self.last_token_at)
                        self.last_token_at = now
                    if kind is TOKEN:
                        self._continuation_token(load_event(ev))
                    elif kind is USAGE:
                        usage2 = load_event(ev).get("usage")
                    elif kind is DONE_EVENT:
                        done = True
                    else:
                        self.sink.raw(ev)
                await self.sink.flush()
        except UPSTREAM_ERRORS as e:
            kind, _ = upstream_failure(e, "stream")
            self.gw.metrics.upstream_errors.labels(replica.label, kind).inc()
            log.warning("request %s: engine %s broke during a trimmed continuation: %r", self.rr.rid, replica.label, e)
        if usage2 is not None:
            total = self._sum_usage(usage2)
            self.rr.account(total, [])
            self.sink.usage(self._usage_chunk(total))
        else:  # no usage from the continuation: count what is known
            self.rr.account({"prompt_tokens": self.p1, "completion_tokens": self.c1}, [])
        if not done:
            self.sink.error(stream_ended())

    def _sum_usage(self, u2: dict) -> dict:
        p2, c2 = _usage_counts(u2)
        p1 = self.p1 if self.saw_usage else max(0, p2 - self.c1 - estimate_tokens(len(self.assistant_text) -
                                                                                  self.cut.keep_at))
        total = dict(u2)
        total.update(prompt_tokens=p1 + p2, completion_tokens=self.c1 + c2, total_tokens=p1 + p2 + self.c1 + c2)
        return total

    def _continuation_token(self, data: dict) -> None:
        data.update(self._head())
        u = data.pop("usage", None)
        if self.client_continuous and isinstance(u, dict):
            data["usage"] = self._sum_usage(u)
        choices = data.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        choice["index"] = 0
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        delta.pop("role", None)
        if self.mode == "reasoning":  # thinking is closed: whatever the parser calls it, it is the answer
            r = "".join(delta.pop(f) or "" for f in REASONING_FIELDS if f in delta)
            if r:
                delta["content"] = r + (delta.get("content") or "")
        if choice.get("finish_reason"):
            self.rr.account(None, [choice])
        if delta.get("content") or choice.get("finish_reason") or _meaningful(data, choice, delta, "content"):
            self.sink.emit(data)


def _meaningful(data: dict, choice: dict, delta: dict, channel: str) -> bool:
    """Whether a chunk whose text is empty still says something (a role, tool calls, logprobs, usage)."""
    if data.get("usage") or choice.get("logprobs"):
        return True
    return any(v not in (None, "", []) for k, v in delta.items() if k != channel)
