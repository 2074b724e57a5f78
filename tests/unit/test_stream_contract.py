"""The gateway relays streams and JSON unchanged in content, and keeps token accounting exact."""
import httpx
import openai

from tests.support.fake_upstream import MODEL
from tests.unit.sse import events

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_chat_stream_events_and_done(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = events(r.text)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "tok0 tok1 tok2 tok3 tok4 "
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # The gateway asks the engine for usage (for its metrics) but the client did not: no usage chunk.
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}
    assert all(c["choices"] for c in chunks)


def test_chat_stream_usage_when_asked(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    ev = events(httpx.post(gw.url + "/v1/chat/completions", json=body).text)
    assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] == 5


def test_completions_stream_and_json(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3}
    ev = events(httpx.post(gw.url + "/v1/completions", json={**body, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == "tok0 tok1 tok2 "
    r = httpx.post(gw.url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "tok0 tok1 tok2 "


def test_extra_fields_pass_through(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    body = {**CHAT, "seed": 3, "n": 1, "stop": ["x"], "response_format": {"type": "json_object"},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "logprobs": True,
            "max_completion_tokens": 4, "some_vllm_field": {"a": 1}}
    assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
    sent = upstream.requests[-1]
    for k, v in body.items():
        assert sent[k] == v


def test_openai_sdk_streaming_with_usage(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "tok0 tok1 tok2 tok3 " and usage.completion_tokens == 4
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_mid_stream_engine_failure_is_an_event_then_done(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True, "fake_break_after": 2})
    assert r.status_code == 200
    ev = events(r.text)
    assert ev[-1] == "[DONE]"
    assert "error" in ev[-2] and ev[-2]["error"]["type"] == "server_error"
    assert [e["choices"][0]["delta"]["content"] for e in ev[:-2]] == ["tok0 ", "tok1 "]
    assert len(upstream.requests) == 1  # bytes already reached the client: no retry


def test_relay_is_not_buffered(upstream, make_gateway):
    """The first token reaches the client while the engine still holds back the second (it waits for the
    test's gate): a buffering relay would deliver nothing before the gate's 30 s fallback."""
    gw = make_gateway([upstream.url])
    with httpx.stream("POST", gw.url + "/v1/chat/completions",
                      json={**CHAT, "max_tokens": 4, "stream": True, "fake_wait_gate": True}, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert '"tok0 "' in first
        assert not upstream.gate.is_set() and upstream.gate_timed_out == 0 and upstream.active == 1
        upstream.gate.set()
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]" and len(rest) == 4 and upstream.gate_timed_out == 0


def test_long_stream_relays_every_event(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 200, "stream": True})
    ev = events(r.text)
    assert len(ev) == 201 and ev[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"]["content"] for e in ev[:-1]) == "".join(f"tok{i} " for i in range(200))
