"""A scripted fake of vLLM's OpenAI server that streams a thinking trace, for thought-trimming tests.

Pure ASGI (it sees disconnects exactly). A chat call streams `script` (one piece = one token, with
vLLM's usage on every chunk when continuous_usage_stats is asked); a trimmed continuation (a final
assistant message containing "</think>" with continue_final_message) streams `answer`. With
reasoning=True the pieces before "</think>" come in the `reasoning` field, like vLLM with a reasoning
parser. /v1/completions answers verifier prompts with Yes/No logprobs from `judge`, after
`verifier_delay` seconds or, with `verifier_gate`, once the test sets that threading.Event."""
from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from typing import Callable, Optional, Sequence

from tests.support.asgi import lifespan, read_json, send_json, watch_disconnect

MODEL = "thinker"


def pieces(text: str) -> list[str]:
    """Token-like pieces: each word with the whitespace before it."""
    return re.findall(r"\s*\S+|\s+", text)


def default_judge(prompt: str) -> float:
    """P(Yes): a step that says "answer is" reaches an answer; answers agree when equal."""
    if "Answer A:" in prompt:
        a = re.search(r"Answer A: (.*)\n", prompt).group(1).strip()
        b = re.search(r"Answer B: (.*)\n", prompt).group(1).strip()
        return 0.9 if a == b else 0.1
    step = prompt.split('"""')[1] if '"""' in prompt else prompt
    return 0.9 if "answer is" in step else 0.1


class ThinkingUpstream:
    def __init__(self, script: Sequence[str], answer: Sequence[str] = ("\n\nThe", " answer", " is", " 5."), *,
                 model: str = MODEL, delay: float = 0.0, answer_delay: Optional[float] = None,
                 reasoning: bool = False, answer_as_reasoning: bool = False, continuous_usage: bool = True,
                 judge: Callable[[str], float] = default_judge, verifier_delay: float = 0.0,
                 max_model_len: int = 4096, break_after: Optional[int] = None):
        self.script, self.answer = list(script), list(answer)
        self.model = model
        self.delay = delay
        self.answer_delay = delay if answer_delay is None else answer_delay
        self.reasoning = reasoning
        self.answer_as_reasoning = answer_as_reasoning  # a reasoning parser that never saw </think>
        self.continuous_usage = continuous_usage
        self.judge = judge
        self.verifier_delay = verifier_delay
        self.verifier_gate: Optional[threading.Event] = None
        self.verifier_answered = 0  # verifier responses sent
        self.verifier_status: Optional[int] = None
        self.continuation_status: Optional[int] = None
        self.max_model_len = max_model_len
        self.break_after = break_after  # first call: drop the connection after this many pieces
        self.url = ""
        self.requests: list[dict] = []  # chat bodies, in arrival order
        self.verifier_requests: list[dict] = []
        self.finished: dict[int, str] = {}  # chat request number -> "completed" | "disconnected"
        self.active = 0
        self.disconnects = 0

    # ---- ASGI ---------------------------------------------------------------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        path = scope["path"]
        if path == "/health":
            return await send_json(send, 200, {})
        if path == "/v1/models":
            return await send_json(send, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "fake",
                 "max_model_len": self.max_model_len}]})
        req = await read_json(receive)
        if path == "/v1/completions":
            return await self._verify(req, send)
        if path != "/v1/chat/completions":
            return await send_json(send, 404, {"error": {"message": "no route", "code": 404}})
        n = len(self.requests)
        self.requests.append(req)
        continuation = self.is_continuation(req)
        if continuation and self.continuation_status:
            return await send_json(send, self.continuation_status,
                                    {"error": {"message": "fake continuation failure", "type": "BadRequestError",
                                               "param": None, "code": self.continuation_status}})
        self.active += 1
        gone, watcher = watch_disconnect(receive)
        try:
            await self._stream(n, req, continuation, send, gone)
        finally:
            watcher.cancel()
            self.active -= 1
            self.finished[n] = "disconnected" if gone.is_set() else "completed"
            if gone.is_set():
                self.disconnects += 1

    @staticmethod
    def is_continuation(req: dict) -> bool:
        last = (req.get("messages") or [{}])[-1]
        return bool(req.get("continue_final_message")) and last.get("role") == "assistant" \
            and "</think>" in (last.get("content") or "")

    @staticmethod
    def prompt_tokens(req: dict) -> int:
        return sum(len(pieces(m.get("content") or "")) for m in req.get("messages") or []) + 3

    async def _stream(self, n: int, req: dict, continuation: bool, send, gone: asyncio.Event) -> None:
        script = self.answer if continuation else self.script
        delay = self.answer_delay if continuation else self.delay
        limit = req.get("max_tokens") or req.get("max_completion_tokens") or 10_000
        opts = req.get("stream_options") or {}
        usage_each = self.continuous_usage and opts.get("include_usage") and opts.get("continuous_usage_stats")
        prompt = self.prompt_tokens(req)
        rid, created = f"chatcmpl-think{n}", 1000 + n
        if not req.get("stream"):
            text = "".join(script[:limit])
            return await send_json(send, 200, {
                "id": rid, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if limit >= len(script) else "length"}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": min(limit, len(script)),
                          "total_tokens": prompt + min(limit, len(script))}})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})

        async def event(delta: dict, finish: Optional[str], tokens: int) -> None:
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if usage_each:
                chunk["usage"] = {"prompt_tokens": prompt, "completion_tokens": tokens,
                                  "total_tokens": prompt + tokens}
            await send({"type": "http.response.body", "body": b"data: " + json.dumps(chunk).encode() + b"\n\n",
                        "more_body": True})

        await event({"role": "assistant", "content": ""}, None, 0)
        thinking = self.reasoning and not continuation
        sent = 0
        for i, piece in enumerate(script):
            if sent and delay:
                try:
                    await asyncio.wait_for(gone.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            if gone.is_set():
                return
            if not continuation and self.break_after is not None and i == self.break_after:
                raise ConnectionAbortedError("fake upstream breaks the stream")  # uvicorn drops the connection
            if thinking and piece == "</think>":
                thinking = False
                continue
            sent += 1
            last = i == len(script) - 1 or sent >= limit
            finish = ("stop" if i == len(script) - 1 else "length") if last else None
            field = "reasoning" if thinking or (continuation and self.answer_as_reasoning) else "content"
            await event({field: piece}, finish, sent)
            if last:
                break
        tail = b""
        if opts.get("include_usage"):
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                     "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": sent,
                                              "total_tokens": prompt + sent}}
            tail = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False})

    async def _verify(self, req: dict, send) -> None:
        self.verifier_requests.append(req)
        if self.verifier_delay:
            await asyncio.sleep(self.verifier_delay)
        t0 = time.monotonic()
        while self.verifier_gate is not None and not self.verifier_gate.is_set() and time.monotonic() - t0 < 30:
            await asyncio.sleep(0.005)
        if self.verifier_status:
            return await send_json(send, self.verifier_status, {"error": {"message": "fake verifier failure"}})
        prompts = req["prompt"] if isinstance(req["prompt"], list) else [req["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            y = min(max(self.judge(p), 1e-6), 1 - 1e-6)
            tops = {" Yes": math.log(y), " No": math.log(1 - y), " The": math.log(1e-3)}
            choices.append({"index": i, "text": " Yes" if y >= 0.5 else " No", "finish_reason": "length",
                            "logprobs": {"tokens": [" Yes" if y >= 0.5 else " No"], "token_logprobs": [0.0],
                                         "top_logprobs": [tops], "text_offset": [0]}})
        await send_json(send, 200, {"id": "cmpl-v", "object": "text_completion", "created": 0, "model": self.model,
                                     "choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                                   "total_tokens": 2}})
        self.verifier_answered += 1
