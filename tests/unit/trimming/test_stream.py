"""Thought trimming in the relay, against a scripted thinking upstream on loopback (real HTTP)."""
import asyncio
import json
import threading

import httpx
import openai
import pytest

from server.trimming import RuleVerifier
from server.trimming.stream import CLOSING_PHRASE, TrimService
from tests.support.probes import metric, wait_for
from tests.support.thinking_upstream import MODEL, ThinkingUpstream, pieces

THOUGHTS = [
    "Let me set up the equations. So x = 3.",  # 0: answer 3
    "\n\nWait, I need y as well, let me expand the product carefully.",  # 1: no answer
    "\n\nBut then the total is 2y + x. Therefore, the answer is 5.",  # 2: answer 5
    "\n\nHmm, I should check the expansion of the product again.",  # 3: no answer
    "\n\nWait, let me verify: 2 + 3 = 5. So the answer is 5.",  # 4: answer 5, agrees with 2 -> cut here
    "\n\nAlternatively, we could use symmetry. So the answer is 5.",  # 5
    "\n\nBut let me also try small cases to be completely sure of it.",  # 6
]
THINKING = "<think>" + "".join(THOUGHTS)
TRACE = THINKING + "</think>\n\nThe answer is 5."
MORE = "".join(f"\n\nHmm, case {i} looks fine too." for i in range(40))  # keeps the engine busy after a cut
LONG = THINKING + MORE + "</think>\n\nThe answer is 5."
CLOSE = "\n\n" + CLOSING_PHRASE + "\n</think>"
ANSWER = ["\n\nThe", " answer", " is", " 5."]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "What is x + y?"}], "stream": True}


@pytest.fixture
def make_thinker(serve_app):
    return lambda script=None, **kw: serve_app(ThinkingUpstream(pieces(TRACE) if script is None else script, **kw))


def stream(gw, body, path="/v1/chat/completions", on_event=None):
    """Every SSE event of a streamed request; on_event(events so far) runs after each one."""
    out = []
    with httpx.stream("POST", gw.url + path, json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
                if on_event:
                    on_event(out)
    return out


def text_of(evs, field="content"):
    return "".join((e["choices"][0]["delta"].get(field) or "") for e in evs
                   if isinstance(e, dict) and e.get("choices"))


def marker_index(evs):
    idx = [i for i, e in enumerate(evs) if isinstance(e, dict) and "leanserve" in e]
    assert len(idx) == 1, idx
    return idx[0]


def assert_valid_stream(evs, first_id, created, usage_asked):
    """One seamless OpenAI stream: same id/created/model, choice 0, one role delta, [DONE] last."""
    assert evs[-1] == "[DONE]"
    chunks = [e for e in evs[:-1]]
    assert all("error" not in c for c in chunks), chunks
    assert {c["id"] for c in chunks} == {first_id}
    assert {c["created"] for c in chunks} == {created}
    assert {c["model"] for c in chunks} == {MODEL}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    token_chunks = [c for c in chunks if c["choices"]]
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in token_chunks)
    assert sum("role" in c["choices"][0]["delta"] for c in token_chunks) == 1
    finished = [c for c in token_chunks if c["choices"][0]["finish_reason"]]
    assert len(finished) == 1 and finished[0] is token_chunks[-1]
    usage = [c for c in chunks if "usage" in c and not c["choices"]]
    assert len(usage) == (1 if usage_asked else 0)
    if usage_asked:
        assert chunks[-1] is usage[0]
    return usage[0]["usage"] if usage_asked else None


def cut_piece(script, upto_chars):
    """Number of pieces the engine had sent when the text reached `upto_chars` + the decisive char."""
    n = 0
    for i, p in enumerate(script):
        n += len(p)
        if n > upto_chars:
            return i + 1
    return len(script)


# ---- the cut -----------------------------------------------------------------------------------------
def test_overthinking_cut_continuation_and_merged_stream(make_thinker, make_gateway):
    up = make_thinker(pieces(LONG), delay=0.02)
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": {"consistency": 2}, "max_tokens": 200,
                      "stream_options": {"include_usage": True}})
    # two engine calls: the first closed by the gateway, the continuation ran to its end
    assert len(up.requests) == 2 and "trim" not in up.requests[0]
    assert wait_for(lambda: up.finished.get(0) == "disconnected" and up.active == 0)
    first, cont = up.requests
    assert first["stream"] is True and first["stream_options"]["continuous_usage_stats"] is True
    # cut after thought 4 (the second agreeing answer): the continuation carries exactly that thinking
    kept = "<think>" + "".join(THOUGHTS[:5])
    assert cont["messages"][:-1] == CHAT["messages"]
    assert cont["messages"][-1] == {"role": "assistant", "content": kept + CLOSE}
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False
    assert cont["stream"] is True and cont["stream_options"]["include_usage"] is True
    script = pieces(LONG)
    c1 = cut_piece(script, len(kept) + len("\n\nAlternatively"))
    assert cont["max_tokens"] == 200 - c1
    # the client saw exactly what the engine continued from, then the answer
    text = text_of(evs)
    assert text == kept + CLOSE + "".join(ANSWER)
    assert "Alternatively" not in text
    m = marker_index(evs)
    assert text_of(evs[: m + 1]) == cont["messages"][-1]["content"]
    marker = evs[m]["leanserve"]["trim"]
    assert marker["reason"] == "overthinking" and marker["thoughts"] == 5
    assert marker["thinking_tokens"] == c1
    assert marker["thinking_tokens_saved_estimate"] == 200 - c1
    usage = assert_valid_stream(evs, "chatcmpl-think0", 1000, usage_asked=True)
    p1, p2 = ThinkingUpstream.prompt_tokens(first), ThinkingUpstream.prompt_tokens(cont)
    assert usage == {"prompt_tokens": p1 + p2, "completion_tokens": c1 + len(ANSWER),
                     "total_tokens": p1 + p2 + c1 + len(ANSWER)}
    assert evs[-2]["choices"] == [] and evs[-3]["choices"][0]["finish_reason"] == "stop"


def test_openai_sdk_reads_the_trimmed_stream(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    s = client.chat.completions.create(model=MODEL, messages=CHAT["messages"], stream=True,
                                       stream_options={"include_usage": True}, extra_body={"trim": True})
    text, usage, ids, marks = "", None, set(), []
    for chunk in s:
        ids.add(chunk.id)
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
        if getattr(chunk, "leanserve", None):
            marks.append(chunk.leanserve)
    assert ids == {"chatcmpl-think0"} and len(marks) == 1
    assert text.endswith(CLOSE + "".join(ANSWER))
    assert usage.completion_tokens > len(ANSWER)


def test_without_include_usage_no_usage_chunk(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": True})
    assert_valid_stream(evs, "chatcmpl-think0", 1000, usage_asked=False)
    assert all("usage" not in e for e in evs[:-1])  # the engine's per-chunk usage is not leaked


def test_max_thoughts_forces_the_answer(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": {"max_thoughts": 2, "consistency": 10}})
    kept = "<think>" + "".join(THOUGHTS[:2])
    assert up.requests[1]["messages"][-1]["content"] == kept + CLOSE
    assert evs[marker_index(evs)]["leanserve"]["trim"]["reason"] == "max_thoughts"
    assert text_of(evs) == kept + CLOSE + "".join(ANSWER)


def test_thinking_budget_cuts_on_engine_token_counts(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": {"thinking_budget": 10, "consistency": 10}, "max_tokens": 100})
    script = pieces(TRACE)
    kept = "".join(script[:10]).rstrip()  # the 10th token is the last kept; "<think>Let" is one piece
    cont = up.requests[1]
    assert cont["messages"][-1]["content"] == kept + CLOSE
    assert cont["max_tokens"] == 90
    marker = evs[marker_index(evs)]["leanserve"]["trim"]
    assert marker == {"reason": "thinking_budget", "thoughts": 0, "thinking_tokens": 10,
                      "thinking_tokens_saved_estimate": 0}
    assert text_of(evs) == kept + CLOSE + "".join(ANSWER)


def test_budget_cut_drops_a_partial_marker(make_thinker, make_gateway):
    script = ["<think>", "So", " x", " =", " 3.", "\n\nWai", "t,", " no", "</think>", "done"]
    up = make_thinker(script)
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": {"thinking_budget": 6}})
    assert up.requests[1]["messages"][-1]["content"] == "<think>So x = 3." + CLOSE
    assert "Wai" not in text_of(evs)


def test_no_cut_relays_the_trace_unchanged(make_thinker, make_gateway):
    trace = "<think>Let me think. So x = 3.\n\nWait, maybe it is 4. So x = 4.</think>\n\nx = 4."
    up = make_thinker(pieces(trace))
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": True, "stream_options": {"include_usage": True}})
    assert len(up.requests) == 1
    assert text_of(evs) == trace
    assert not any("leanserve" in e for e in evs[:-1])
    usage = assert_valid_stream(evs, "chatcmpl-think0", 1000, usage_asked=True)
    assert usage["completion_tokens"] == len(pieces(trace))
    assert metric(gw.url, "leanserve_trims_total") == 0
    # thinking tokens: the pieces from the one with <think> through the one with </think>
    thinking = next(i for i, p in enumerate(pieces(trace)) if "</think>" in p) + 1
    assert metric(gw.url, "leanserve_trim_thinking_tokens_total", model=MODEL) == thinking


def test_text_without_thinking_passes_through(make_thinker, make_gateway):
    up = make_thinker(pieces("The answer is 5. But wait, there is more.\n\nWait, no."))
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": {"thinking_budget": 1}})
    assert len(up.requests) == 1 and text_of(evs) == "The answer is 5. But wait, there is more.\n\nWait, no."


def test_plain_request_is_untouched(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    evs = stream(gw, CHAT)
    assert len(up.requests) == 1 and text_of(evs) == TRACE
    assert up.requests[0]["stream_options"] == {"include_usage": True}


# ---- where thinking comes from -----------------------------------------------------------------------
def test_reasoning_field(make_thinker, make_gateway):
    up = make_thinker(pieces("".join(THOUGHTS)) + ["</think>"] + pieces("\n\nThe answer is 5."), reasoning=True,
                      answer_as_reasoning=True)
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": True})
    kept = "".join(THOUGHTS[:5])
    assert up.requests[1]["messages"][-1]["content"] == "<think>\n" + kept + CLOSE
    assert text_of(evs, "reasoning") == kept + "\n\n" + CLOSING_PHRASE + "\n"
    assert text_of(evs) == "".join(ANSWER)  # relayed as content although the parser called it reasoning
    assert_valid_stream(evs, "chatcmpl-think0", 1000, usage_asked=False)


def test_assistant_prefill_counts_as_output(make_thinker, make_gateway):
    up = make_thinker(pieces("".join(THOUGHTS) + "</think>\n\nThe answer is 5."))
    gw = make_gateway([up.url])
    msgs = CHAT["messages"] + [{"role": "assistant", "content": "<think>"}]
    evs = stream(gw, {**CHAT, "messages": msgs, "continue_final_message": True, "add_generation_prompt": False,
                      "trim": True})
    kept = "".join(THOUGHTS[:5])
    cont = up.requests[1]
    assert cont["messages"] == CHAT["messages"] + [{"role": "assistant", "content": "<think>" + kept + CLOSE}]
    assert text_of(evs) == kept + CLOSE + "".join(ANSWER)  # the client never gets its own prefill back


# ---- a slow verifier never stalls the relay ------------------------------------------------------------
class BlockedVerifier(RuleVerifier):
    """Answers only once the test releases it (set from the test's thread; polled in the gateway's loop)."""

    def __init__(self):
        super().__init__()
        self.release, self.calls, self.returned = threading.Event(), 0, 0

    async def answers(self, thoughts, question=None):
        self.calls += 1
        while not self.release.is_set():
            await asyncio.sleep(0.005)
        self.returned += 1
        return await super().answers(thoughts, question)


def with_verifier(gw, verifier):
    svc: TrimService = gw.app.state.gateway["gw"].trim
    svc.verifier = lambda kind, client, url, model: verifier


def test_a_blocked_verifier_never_stalls_the_relay(make_thinker, make_gateway):
    up = make_thinker(pieces(TRACE))
    gw = make_gateway([up.url])
    blocked = BlockedVerifier()
    with_verifier(gw, blocked)
    evs = stream(gw, {**CHAT, "trim": True})
    # The whole response reached the client while the verifier, asked, had not answered once.
    assert blocked.calls >= 1 and blocked.returned == 0
    assert text_of(evs) == TRACE and len(up.requests) == 1
    assert_valid_stream(evs, "chatcmpl-think0", 1000, usage_asked=False)
    blocked.release.set()


def test_late_cut_keeps_what_the_client_already_saw(make_thinker, make_gateway):
    up = make_thinker(pieces(THINKING + MORE[:250] + "</think>\n\nThe answer is 5."), delay=0.01)
    gw = make_gateway([up.url])
    blocked = BlockedVerifier()
    with_verifier(gw, blocked)
    decisive = len("<think>" + "".join(THOUGHTS[:5]))
    seen_at_release = []

    def release_late(evs):  # the verifier answers only once the client has text well past the decisive thought
        if not blocked.release.is_set() and len(text_of(evs)) > decisive + 60:
            seen_at_release.append(text_of(evs))
            blocked.release.set()

    evs = stream(gw, {**CHAT, "trim": True}, on_event=release_late)
    m = marker_index(evs)
    cont = up.requests[1]
    seen = text_of(evs[: m + 1])
    # whatever the client had when the late decision came is exactly what the engine continues from
    assert cont["messages"][-1]["content"] == seen and seen.endswith(CLOSE)
    kept = seen[: -len(CLOSE)]
    assert (THINKING + MORE).startswith(kept) and kept.startswith(seen_at_release[0])
    assert len(kept) > decisive + 60
    assert_valid_stream(evs, "chatcmpl-think0", 1000, usage_asked=False)


# ---- non-streaming, validation, defaults, failures, disconnects, metrics --------------------------------
def test_non_streaming_trim_returns_one_completion(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": False, "trim": True})
    assert r.status_code == 200
    body = r.json()
    kept = "<think>" + "".join(THOUGHTS[:5])
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-think0"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": kept + CLOSE + "".join(ANSWER)}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["leanserve"]["trim"]["reason"] == "overthinking"
    assert body["usage"]["completion_tokens"] > len(ANSWER)
    assert up.requests[0]["stream"] is True  # the engine streams so that it can be cut


@pytest.mark.parametrize("trim,param", [
    ({"consistency": 0}, "trim.consistency"), ({"consistency": 11}, "trim.consistency"),
    ({"max_thoughts": 0}, "trim.max_thoughts"), ({"thinking_budget": 0}, "trim.thinking_budget"),
    ({"verifier": "oracle"}, "trim.verifier"), ({"bogus": 1}, "trim.bogus"), ({"enabled": "yes"}, "trim.enabled"),
    ("yes", "trim"), (1, "trim"),
])
def test_bad_trim_is_400(make_thinker, make_gateway, trim, param):
    up = make_thinker()
    gw = make_gateway([up.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "trim": trim})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert not up.requests


def test_trim_where_it_cannot_apply_is_400(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    r = httpx.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "trim": True})
    assert r.status_code == 400 and "chat/completions" in r.json()["error"]["message"]
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "n": 2, "trim": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "trim"
    # disabled trimming is accepted anywhere and never reaches the engine
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": False, "trim": {"enabled": False}})
    assert r.status_code == 200 and "trim" not in up.requests[-1]


def test_server_default(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url], trim_default=True)
    evs = stream(gw, CHAT)
    assert len(up.requests) == 2 and marker_index(evs) >= 0
    evs = stream(gw, {**CHAT, "trim": False})
    assert len(up.requests) == 3 and text_of(evs) == TRACE
    # n=2 is not trimmable: the default skips it instead of refusing it
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "n": 2, "stream": False})
    assert r.status_code == 200 and len(up.requests) == 4


def test_engine_breaking_inside_the_thinking_loses_no_text(make_thinker, make_gateway):
    up = make_thinker(break_after=12)
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": True})
    assert evs[-1] == "[DONE]" and "error" in evs[-2]
    assert text_of(evs) == "".join(pieces(TRACE)[:12])  # the held-back tail too
    assert len(up.requests) == 1


def test_continuation_failure_is_reported_in_band(make_thinker, make_gateway):
    up = make_thinker()
    up.continuation_status = 400
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": True})
    assert evs[-1] == "[DONE]" and "error" in evs[-2]
    assert text_of(evs).endswith(CLOSE)


def test_disconnect_during_continuation_closes_it(make_thinker, make_gateway):
    up = make_thinker(pieces(LONG), answer=[" tok"] * 500, delay=0.01, answer_delay=0.02)
    gw = make_gateway([up.url])
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**CHAT, "trim": True}, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += " tok" in line
            if seen >= 5:
                break
    assert wait_for(lambda: up.active == 0 and up.finished.get(1) == "disconnected")
    assert up.finished[0] == "disconnected" and len(up.requests) == 2
    assert wait_for(lambda: metric(gw.url, "leanserve_requests_in_flight") == 0)
    assert metric(gw.url, "leanserve_engine_requests_in_flight") == 0


def test_disconnect_during_thinking_closes_the_first_call(make_thinker, make_gateway):
    up = make_thinker(pieces(THINKING) * 20, delay=0.02)
    gw = make_gateway([up.url])
    with_verifier(gw, BlockedVerifier())  # pending verifier work (never released) must not keep anything open
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json={**CHAT, "trim": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 20:
                break
    assert wait_for(lambda: up.active == 0 and up.finished.get(0) == "disconnected")
    assert len(up.requests) == 1


def test_trim_metrics(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": True, "max_tokens": 300})
    marker = evs[marker_index(evs)]["leanserve"]["trim"]
    assert metric(gw.url, "leanserve_trims_total", model=MODEL, reason="overthinking") == 1
    assert metric(gw.url, "leanserve_trim_thinking_tokens_total", model=MODEL) == marker["thinking_tokens"]
    assert metric(gw.url, "leanserve_trim_tokens_saved_total", model=MODEL) == 300 - marker["thinking_tokens"]
    assert metric(gw.url, "leanserve_trim_verifier_seconds_count", verifier="rule") >= 5
    assert metric(gw.url, "leanserve_completion_tokens_total", model=MODEL) == marker["thinking_tokens"] + len(ANSWER)
    assert metric(gw.url, "leanserve_finished_choices_total", model=MODEL, finish_reason="stop") == 1


def test_saved_estimate_against_the_context_without_max_tokens(make_thinker, make_gateway):
    up = make_thinker()
    gw = make_gateway([up.url])
    evs = stream(gw, {**CHAT, "trim": True})
    marker = evs[marker_index(evs)]["leanserve"]["trim"]
    p1 = ThinkingUpstream.prompt_tokens(up.requests[0])
    assert marker["thinking_tokens_saved_estimate"] == 4096 - p1 - marker["thinking_tokens"]
