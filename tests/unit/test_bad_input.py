"""Malformed bodies get a 400 in OpenAI's shape at the gateway and never reach the engine; the kept-alive
connection stays usable after them."""
import httpx
import pytest

from tests.support.fake_upstream import MODEL

MSGS = '[{"role": "user", "content": "hi"}]'


def body(extra: str) -> bytes:
    return ('{"model": "%s", "messages": %s, "max_tokens": 2%s}' % (MODEL, MSGS, extra)).encode()


CASES = {
    "deep nesting": ('{"model": "m", "messages": ' + "[" * 1000 + "]" * 1000 + "}").encode(),
    "moderate nesting beyond the cap": body(', "x": ' + "[" * 100 + "]" * 100),
    "NaN": body(', "temperature": NaN'),
    "Infinity": body(', "temperature": Infinity'),
    "-Infinity": body(', "top_p": -Infinity'),
    "1e400": body(', "temperature": 1e400'),
    "huge integer": body(', "seed": ' + "9" * 5000),
    "unknown role": ('{"model": "%s", "messages": [{"role": "wizard", "content": "hi"}]}' % MODEL).encode(),
    "top_h as a string": body(', "top_h": "0.9"'),
    "temperature as a bool": body(', "temperature": true'),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_body_is_400_and_the_connection_survives(upstream, make_gateway, name):
    gw = make_gateway([upstream.url])
    with httpx.Client(base_url=gw.url, timeout=20) as c:
        r = c.post("/v1/chat/completions", content=CASES[name], headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
        assert c.post("/v1/chat/completions", content=body(""),
                      headers={"content-type": "application/json"}).status_code == 200  # same connection
    assert len(upstream.requests) == 1


def test_messages_name_the_problem(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    post = lambda raw: httpx.post(gw.url + "/v1/chat/completions", content=raw).json()["error"]  # noqa: E731
    e = post(CASES["top_h as a string"])
    assert e["param"] == "top_h" and "valid number" in e["message"] and "integer" not in e["message"]
    e = post(CASES["unknown role"])
    assert e["param"] == "messages.0.role" and "'user'" in e["message"]
    assert "nested" in post(CASES["deep nesting"])["message"]
    assert "NaN" in post(CASES["NaN"])["message"]


@pytest.mark.parametrize("role", ["developer", "system", "user", "assistant", "tool", "function"])
def test_openai_roles_pass(upstream, make_gateway, role):
    gw = make_gateway([upstream.url])
    msgs = [{"role": "user", "content": "hi"}, {"role": role, "content": "x"}]
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": MODEL, "messages": msgs, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_openapi_document_lists_the_relay_routes(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    doc = httpx.get(gw.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        op = doc["paths"][path]["post"]
        assert "requestBody" in op and {"400", "429", "503"} <= set(op["responses"])
