"""Retries only what is safe: connection failures and 502/503 before anything reached the client, at most
upstream_retries more replicas. Other engine errors go to the client at once, in OpenAI's shape."""
import httpx

from tests.support.fake_upstream import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_engine_500_is_not_replayed_on_other_replicas(make_upstream, make_gateway):
    a, b = make_upstream(), make_upstream()
    a.fail_status = 500
    gw = make_gateway([a.url, b.url])  # ties go to the first listed
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and r.json()["error"]["message"] == "fake failure 500"
    assert len(a.requests) == 1 and len(b.requests) == 0


def test_503_retries_are_bounded(make_upstream, make_gateway):
    ups = [make_upstream() for _ in range(4)]
    for u in ups:
        u.fail_status = 503
    gw = make_gateway([u.url for u in ups], upstream_retries=1)
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert sum(len(u.requests) for u in ups) == 2  # the first try + one retry


def test_engine_4xx_is_relayed_without_retry(make_upstream, make_gateway):
    a, b = make_upstream(), make_upstream()
    gw = make_gateway([a.url, b.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "fake_status": 422})
    assert r.status_code == 422 and r.json()["error"]["message"] == "fake failure 422"
    assert len(a.requests) + len(b.requests) == 1
