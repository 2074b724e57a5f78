import asyncio

import httpx

from tests.support.fake_upstream import MODEL
from tests.support.probes import metric, until

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
HOLD = {**CHAT, "stream": True, "fake_wait_gate": True}  # holds its slot until the test opens the gate


def test_api_keys(upstream, make_gateway):
    gw = make_gateway([upstream.url], api_keys=["k-one", "k-two"])
    url = gw.url + "/v1/chat/completions"
    r = httpx.post(url, json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, json=CHAT, headers={"authorization": "Basic k-one"}).status_code == 401
    assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer k-two"}).status_code == 200
    assert httpx.get(gw.url + "/v1/models").status_code == 401
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(gw.url + path).status_code == 200
    assert len(upstream.requests) == 1


def test_api_keys_protect_ops(upstream, make_gateway):
    gw = make_gateway([upstream.url], api_keys=["k"], protect_ops_endpoints=True)
    assert httpx.get(gw.url + "/metrics").status_code == 401
    assert httpx.get(gw.url + "/metrics", headers={"authorization": "Bearer k"}).status_code == 200


def test_queue_full_is_429_with_retry_after(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_concurrency=1, max_queue=1, retry_after=3)

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as c:
            running = asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=HOLD))
            assert await until(lambda: upstream.active == 1)
            queued = asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=CHAT))
            assert await until(lambda: metric(gw.url, "leanserve_requests_queued") == 1)
            rejected = await c.post(gw.url + "/v1/chat/completions", json=CHAT)
            upstream.gate.set()
            return await running, await queued, rejected
    running, queued, rejected = asyncio.run(scenario())
    assert running.status_code == 200 and queued.status_code == 200
    assert rejected.status_code == 429 and rejected.headers["retry-after"] == "3"
    assert rejected.json()["error"]["type"] == "rate_limit_error"
    assert rejected.json()["error"]["code"] == "queue_full"


def test_queue_timeout_is_429(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_concurrency=1, max_queue=5, queue_timeout=0.3)

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as c:
            running = asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=HOLD))
            assert await until(lambda: upstream.active == 1)
            late = await c.post(gw.url + "/v1/chat/completions", json=CHAT)
            upstream.gate.set()
            return await running, late
    running, late = asyncio.run(scenario())
    assert running.status_code == 200
    assert late.status_code == 429 and late.json()["error"]["code"] == "queue_timeout"
    assert "retry-after" in late.headers


def test_per_key_concurrency_limit(upstream, make_gateway):
    gw = make_gateway([upstream.url], api_keys=["k-a", "k-b"], key_max_concurrency=1, retry_after=2)
    a, b = {"authorization": "Bearer k-a"}, {"authorization": "Bearer k-b"}

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as c:
            held = asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=HOLD, headers=a))
            assert await until(lambda: upstream.active == 1)
            second = await c.post(gw.url + "/v1/chat/completions", json=CHAT, headers=a)
            other = await c.post(gw.url + "/v1/chat/completions", json=CHAT, headers=b)
            upstream.gate.set()
            return await held, second, other
    held, second, other = asyncio.run(scenario())
    assert held.status_code == 200 and other.status_code == 200
    assert second.status_code == 429 and second.json()["error"]["code"] == "key_concurrency"
    assert second.headers["retry-after"] == "2"
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=a).status_code == 200  # slot freed


def test_per_key_token_rate(upstream, make_gateway):
    gw = make_gateway([upstream.url], api_keys=["k-a", "k-b"], key_tokens_per_minute=10)
    a = {"authorization": "Bearer k-a"}
    url = gw.url + "/v1/chat/completions"
    assert httpx.post(url, json=CHAT, headers=a).status_code == 200  # 7 + 2 tokens: 1 left
    assert httpx.post(url, json=CHAT, headers=a).status_code == 200  # admitted on 1 left: now overdrawn
    r = httpx.post(url, json=CHAT, headers=a)
    assert r.status_code == 429 and r.json()["error"]["code"] == "key_token_rate"
    assert int(r.headers["retry-after"]) >= 1
    assert httpx.post(url, json=CHAT, headers={"authorization": "Bearer k-b"}).status_code == 200
