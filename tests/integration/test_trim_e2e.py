"""Thought trimming end to end on the real vLLM CPU engine (SmolLM2-135M-Instruct, which does not think
on its own: a system message asks for thinking in <think> tags and the assistant turn is prefilled
with "<think>\\n", so every generated token is thinking until the model closes the tag). A small
thinking_budget makes the cut deterministic; the point is that the trim path runs on a real engine:
abort, continuation with continue_final_message, one well-formed stream, honest usage, no request
left running after a client disconnect."""
import json

import httpx
import pytest

from server.trimming.stream import CLOSING_PHRASE
from tests.integration.conftest import MODEL
from tests.support.probes import metric, wait_for

pytestmark = pytest.mark.integration
SYSTEM = ("You are a careful solver. First think step by step inside <think> and </think> tags, "
          "checking your work, then give the final answer.")
PREFILL = "<think>\n"
MESSAGES = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "A farmer has 3 pens with 4 sheep each. How many sheep are there?"},
            {"role": "assistant", "content": PREFILL}]
BODY = {"model": MODEL, "messages": MESSAGES, "continue_final_message": True, "add_generation_prompt": False,
        "temperature": 0, "stream": True}


def sse(resp):
    for line in resp.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            yield payload if payload == "[DONE]" else json.loads(payload)


def running(engine_url) -> float:
    return metric(engine_url, "vllm:num_requests_running")


def wait_idle(engine_url, timeout=180.0) -> bool:  # a bound on waiting (steps are slow on shared cores)
    return wait_for(lambda: running(engine_url) == 0, timeout, interval=0.2)


def prompt_tokens(engine_url, messages) -> int:
    r = httpx.post(engine_url + "/tokenize", json={"model": MODEL, "messages": messages,
                                                   "add_generation_prompt": False, "continue_final_message": True},
                   timeout=30)
    r.raise_for_status()
    return r.json()["count"]


def test_budget_trim_end_to_end(served):
    assert wait_idle(served.engine_url)
    body = {**BODY, "max_tokens": 48, "stream_options": {"include_usage": True},
            "trim": {"thinking_budget": 12, "consistency": 10}}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=180) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        evs = list(sse(r))
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all("error" not in c for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {MODEL}
    tokens = [c for c in chunks if c["choices"]]
    assert all(c["choices"][0]["index"] == 0 for c in tokens)
    assert sum("role" in c["choices"][0]["delta"] for c in tokens) == 1
    marks = [i for i, c in enumerate(chunks) if "leanserve" in c]
    assert len(marks) == 1, chunks
    trim = chunks[marks[0]]["leanserve"]["trim"]
    # the engine's own token counts: the cut comes at the chunk that reaches the budget
    assert trim["reason"] == "thinking_budget" and 12 <= trim["thinking_tokens"] <= 14
    assert trim["thinking_tokens_saved_estimate"] == 0  # estimated against the thinking budget it reached
    thinking = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[: marks[0] + 1])
    assert thinking.endswith(CLOSING_PHRASE + "\n</think>")
    finished = [c for c in tokens if c["choices"][0]["finish_reason"]]
    assert len(finished) == 1 and finished[0] is tokens[-1]
    assert finished[0]["choices"][0]["finish_reason"] in ("stop", "length")
    # usage: both calls; the continuation's prompt is the original one + the thinking it continues from
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    p1 = prompt_tokens(served.engine_url, MESSAGES)
    p2 = prompt_tokens(served.engine_url, MESSAGES[:-1] + [{"role": "assistant", "content": PREFILL + thinking}])
    assert usage["prompt_tokens"] == p1 + p2
    answer_chunks = sum(bool(c["choices"][0]["delta"].get("content")) for c in tokens[marks[0] + 1:])
    assert usage["completion_tokens"] >= trim["thinking_tokens"] + answer_chunks
    assert usage["completion_tokens"] <= 48
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert wait_idle(served.engine_url)


def test_non_streaming_trim_end_to_end(served):
    body = {**BODY, "stream": False, "max_tokens": 32, "trim": {"thinking_budget": 8}}
    r = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["leanserve"]["trim"]["reason"] == "thinking_budget"
    assert CLOSING_PHRASE + "\n</think>" in data["choices"][0]["message"]["content"]
    assert data["usage"]["completion_tokens"] >= 8


def _disconnect_after(served, body, stop) -> None:
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=180) as r:
        assert r.status_code == 200
        for n, ev in enumerate(sse(r)):
            if stop(n, ev):
                assert running(served.engine_url) >= 1  # the engine is busy with this request
                break


def test_disconnect_during_the_continuation_leaves_nothing_running(served):
    assert wait_idle(served.engine_url)
    body = {**BODY, "max_tokens": 400, "ignore_eos": True, "trim": {"thinking_budget": 6}}
    seen = {"marker": None}

    def stop(n, ev):
        if isinstance(ev, dict) and "leanserve" in ev:
            seen["marker"] = n
        return seen["marker"] is not None and n >= seen["marker"] + 3

    _disconnect_after(served, body, stop)
    assert seen["marker"] is not None
    assert wait_idle(served.engine_url), "the continuation kept running after the client left"


def test_disconnect_during_the_thinking_leaves_nothing_running(served):
    assert wait_idle(served.engine_url)
    body = {**BODY, "max_tokens": 400, "ignore_eos": True, "trim": {"thinking_budget": 390}}
    _disconnect_after(served, body, lambda n, ev: n >= 6)
    assert wait_idle(served.engine_url), "the first call kept running after the client left"


# The overthinking cut decided by the model's own output. The prompt asks for checks that begin with "Wait";
# the prefill holds the first answer-bearing thought and opens the second. Greedy, the model completes the
# second with the same answer (12) and starts a third with "\n\nWait": two agreeing thoughts (consistency 2),
# the cut comes after the second, before the client sees the third.
OVER_SYSTEM = ("You are a careful solver. Think step by step inside <think> and </think> tags. After you find the "
               "answer, check it again several times; begin every check with the word \"Wait\". Then give the "
               "final answer.")
OVER_PREFILL = "<think>\n3 pens with 4 sheep each: 3 x 4 = 12. So the answer is 12.\n\nWait, let me check:"
OVER_MESSAGES = [{"role": "system", "content": OVER_SYSTEM},
                 {"role": "user", "content": "A farmer has 3 pens with 4 sheep each. How many sheep are there?"},
                 {"role": "assistant", "content": OVER_PREFILL}]


def test_overthinking_cut_end_to_end(served):
    assert wait_idle(served.engine_url)
    body = {**BODY, "messages": OVER_MESSAGES, "max_tokens": 80, "ignore_eos": True,
            "stream_options": {"include_usage": True}, "trim": {"consistency": 2, "verifier": "rule"}}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=180) as r:
        assert r.status_code == 200
        evs = list(sse(r))
    assert evs[-1] == "[DONE]" and all("error" not in c for c in evs[:-1])
    chunks = evs[:-1]
    marks = [i for i, c in enumerate(chunks) if "leanserve" in c]
    assert len(marks) == 1, chunks
    trim = chunks[marks[0]]["leanserve"]["trim"]
    assert trim["reason"] == "overthinking" and trim["thoughts"] == 2, trim
    thinking = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[: marks[0] + 1] if c["choices"])
    # the client got the model's second thought (its own prefill is never sent back), then the close
    assert thinking.endswith("So the answer is 12.\n\n" + CLOSING_PHRASE + "\n</think>"), thinking
    assert "Wait" not in thinking  # the third thought, which the cut removed, never reached the client
    answer = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[marks[0] + 1:] if c["choices"])
    assert answer.strip()
    # the first call was aborted before its 80 tokens; the usage covers both calls
    assert trim["thinking_tokens"] < 60 and trim["thinking_tokens_saved_estimate"] > 0
    assert chunks[-1]["usage"]["completion_tokens"] <= 80
    assert wait_idle(served.engine_url)
