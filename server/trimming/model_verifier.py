"""The `model` verifier: an LLM answers the two questions thought trimming asks, as P(Yes).

"Does this thought reach a final answer?" and "are these two answers the same?" are each one
prefill-only call: a /v1/completions prompt ending in "Answer:", max_tokens=1, logprobs=5, and
P(Yes) = P(" Yes") / (P(" Yes") + P(" No")) read from the top logprobs of the one generated token.
Questions from every stream that uses the same endpoint and model are batched: those asked within
`batch_window` seconds (or `max_batch` of them) go out as one request with a list of prompts, in a
background task. A failure, a timeout or an unreadable answer is "no decision" (the thought reaches
no answer; the answers do not agree), so a broken verifier can only make trimming cut less.

The answer string a thought reaches (what the policy compares) is the rule extractor's when it
finds one, else the thought's last sentence; the model decides whether there is an answer at all.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
from typing import Optional, Sequence

import aiohttp

from .answers import answers_equal, thought_answer
from .rule_verifier import Verifier

log = logging.getLogger("leanserve.trimming.model_verifier")

REACH_PROMPT = (
    "You are checking one step of a solution.\n\n{question}"
    'Step:\n"""\n{thought}\n"""\n\n'
    "Does this step state a final answer to the problem? Answer Yes or No.\nAnswer:"
)
AGREE_PROMPT = (
    "You are comparing two answers to the same problem.\n\n{question}"
    "Answer A: {a}\nAnswer B: {b}\n\n"
    "Are answer A and answer B the same answer? Answer Yes or No.\nAnswer:"
)
_YES, _NO = "yes", "no"


def p_yes(top_logprobs: Optional[dict]) -> Optional[float]:
    """P(Yes) among the Yes/No candidates of one token's top logprobs; None when neither is there."""
    if not isinstance(top_logprobs, dict):
        return None
    yes = no = 0.0
    for tok, lp in top_logprobs.items():
        if not isinstance(tok, str) or not isinstance(lp, (int, float)):
            continue
        word = tok.strip().lower()
        if word == _YES:
            yes += math.exp(lp)
        elif word == _NO:
            no += math.exp(lp)
    if yes + no <= 0.0:
        return None
    return yes / (yes + no)


def _last_sentence(text: str, limit: int = 300) -> str:
    text = text.strip()
    parts = re.split(r"(?<=[.!?])\s+", text)
    return (parts[-1] if parts else text)[-limit:]


class ModelVerifier(Verifier):
    def __init__(
        self,
        client: aiohttp.ClientSession,
        url: str,
        model: str,
        *,
        timeout: float = 10.0,
        threshold: float = 0.5,
        max_batch: int = 32,
        batch_window: float = 0.005,
        max_thought_chars: int = 3000,
        max_question_chars: int = 2000,
    ) -> None:
        self.client = client
        self.url = url.rstrip("/") + "/v1/completions"
        self.model = model
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.threshold = threshold
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.max_thought_chars = max_thought_chars
        self.max_question_chars = max_question_chars
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._timer: Optional[asyncio.TimerHandle] = None
        self._tasks: set[asyncio.Task] = set()
        self.calls = 0  # HTTP requests made (one per batch), for tests and debugging
        self.failures = 0

    # ---- the Verifier protocol ----------------------------------------------------------------
    async def answers(self, thoughts: Sequence[str], question: Optional[str] = None) -> list[Optional[str]]:
        q = self._question(question)
        probs = await self.ask([REACH_PROMPT.format(question=q, thought=t[-self.max_thought_chars:].strip())
                                for t in thoughts])
        out: list[Optional[str]] = []
        for t, p in zip(thoughts, probs):
            if p is None or p < self.threshold:
                out.append(None)
            else:
                out.append(thought_answer(t) or _last_sentence(t))
        return out

    async def agreements(self, pairs: Sequence[tuple[str, str]], question: Optional[str] = None) -> list[bool]:
        result = [a is not None and b is not None and answers_equal(a, b) for a, b in pairs]
        ask = [i for i, same in enumerate(result) if not same and pairs[i][0] and pairs[i][1]]
        if ask:
            q = self._question(question)
            probs = await self.ask([AGREE_PROMPT.format(question=q, a=pairs[i][0], b=pairs[i][1]) for i in ask])
            for i, p in zip(ask, probs):
                result[i] = p is not None and p >= self.threshold
        return result

    # ---- batching -----------------------------------------------------------------------------
    async def ask(self, prompts: Sequence[str]) -> list[Optional[float]]:
        """P(Yes) for each prompt (None: no decision). Cancelling the caller leaves the shared
        batch request running for the other streams in it."""
        if not prompts:
            return []
        futures = [self._enqueue(p) for p in prompts]
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise

    def _enqueue(self, prompt: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((prompt, fut))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.batch_window, self._flush)
        return fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        batch = [(p, f) for p, f in batch if not f.done()]
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        probs: list[Optional[float]] = [None] * len(batch)
        self.calls += 1
        try:
            body = {"model": self.model, "prompt": [p for p, _ in batch], "max_tokens": 1, "logprobs": 5,
                    "temperature": 0, "stream": False}
            async with self.client.post(self.url, json=body, timeout=self.timeout) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}: {str(data)[:200]}")
            for pos, choice in enumerate(data.get("choices") or []):
                i = choice.get("index", pos)
                if isinstance(i, int) and 0 <= i < len(batch):
                    tops = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0]
                    probs[i] = p_yes(tops)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is "no decision", never a broken request
            self.failures += 1
            log.warning("model verifier call to %s failed: %r", self.url, e)
        finally:
            for (_, fut), p in zip(batch, probs):
                if not fut.done():
                    fut.set_result(p)

    def _question(self, question: Optional[str]) -> str:
        if not question:
            return ""
        return f"Problem:\n{question.strip()[:self.max_question_chars]}\n\n"

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
