"""Every error is OpenAI's shape with a 4xx/5xx that says what went wrong — never a 500 for bad input."""
import httpx
import pytest

from tests.support.fake_upstream import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def assert_openai_error(r: httpx.Response, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("raw,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'"text"', None),
    (b'{"model": "fake-model", "messages": "hi"}', "messages"),
    (b'{"model": "fake-model", "messages": []}', "messages"),
    (b'{"model": "fake-model", "messages": [{"content": "x"}]}', "messages.0.role"),
    (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": "7"}', "max_tokens"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "temperature": -1}', "temperature"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "top_h": 1.5}', "top_h"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    (b'\xff\xfe', None),
])
def test_bad_chat_bodies_are_400(upstream, make_gateway, raw, param):
    gw = make_gateway([upstream.url])
    r = httpx.post(gw.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param=param)
    assert upstream.requests == []  # rejected at the gateway


def test_bad_completion_prompt_is_400(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    r = httpx.post(gw.url + "/v1/completions", json={"model": MODEL, "prompt": {"a": 1}})
    assert_openai_error(r, 400, param="prompt")


def test_unknown_model_is_404(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert_openai_error(r, 404, param="model", code="model_not_found")
    metrics = httpx.get(gw.url + "/metrics").text
    assert 'model="nope"' not in metrics  # client-chosen names never become label values


def test_missing_model_defaults_to_the_only_one(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    body = {k: v for k, v in CHAT.items() if k != "model"}
    assert httpx.post(gw.url + "/v1/chat/completions", json=body).status_code == 200
    assert upstream.requests[-1]["model"] == MODEL


def test_unknown_route_and_method(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    assert_openai_error(httpx.get(gw.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(gw.url + "/v1/chat/completions"), 405)


def test_body_too_large_is_413(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_body_bytes=2048)
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(httpx.post(gw.url + "/v1/chat/completions", json=body), 413)


def test_upstream_4xx_is_relayed_in_openai_shape(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "fake_status": 400})
    err = assert_openai_error(r, 400)
    assert err["message"] == "fake failure 400" and err["type"] == "invalid_request_error"


def test_no_healthy_engine_is_503(make_gateway):
    from tests.support.servers import free_port
    gw = make_gateway([f"http://127.0.0.1:{free_port()}"])
    assert_openai_error(httpx.post(gw.url + "/v1/chat/completions", json=CHAT), 503, code="engine_unavailable")
    assert_openai_error(httpx.get(gw.url + "/ready"), 503)
    assert httpx.get(gw.url + "/health").status_code == 200  # liveness is the gateway's own
