"""Least-in-flight routing over healthy replicas; failover only while nothing reached the client."""
import asyncio
import time

import httpx

from tests.support.fake_upstream import MODEL
from tests.support.servers import free_port

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_least_in_flight_spreads_concurrent_requests(make_upstream, make_gateway):
    a, b = make_upstream(), make_upstream()
    gw = make_gateway([a.url, b.url])

    async def burst():
        async with httpx.AsyncClient(timeout=30) as c:
            rs = await asyncio.gather(*[c.post(gw.url + "/v1/chat/completions",
                                               json={**CHAT, "fake_first_token_delay": 0.5}) for _ in range(6)])
        assert all(r.status_code == 200 for r in rs)
    asyncio.run(burst())
    assert (len(a.requests), len(b.requests)) == (3, 3)


def test_failover_to_healthy_replica_on_connect_error(make_upstream, make_gateway):
    b = make_upstream()
    dead = f"http://127.0.0.1:{free_port()}"
    gw = make_gateway([dead, b.url], health_interval=60)
    # Pretend the dead one was healthy at the last probe: the request must still succeed via b.
    pool = gw.app.state.gateway["gw"].pool
    pool.replicas[0].healthy, pool.replicas[0].models = True, [{"id": MODEL}]
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert len(b.requests) == 1
    assert pool.replicas[0].healthy is False  # marked down at once, not at the next probe


def test_failover_on_engine_5xx(make_upstream, make_gateway):
    a, b = make_upstream(), make_upstream()
    a.fail_status = 503
    gw = make_gateway([a.url, b.url])
    for _ in range(3):
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
    assert len(b.requests) == 3


def test_all_replicas_failing_returns_last_error(make_upstream, make_gateway):
    a = make_upstream()
    a.fail_status = 500
    gw = make_gateway([a.url])
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 500 and r.json()["error"]["message"] == "fake failure 500"


def test_health_probes_track_replicas(make_upstream, make_gateway):
    a, b = make_upstream(), make_upstream()
    gw = make_gateway([a.url, b.url])
    a.healthy = False
    time.sleep(0.8)
    ready = httpx.get(gw.url + "/ready").json()
    assert [e["healthy"] for e in ready["engines"]] == [False, True]
    for _ in range(4):
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
    assert len(a.requests) == 0 and len(b.requests) == 4
    a.healthy = False
    b.healthy = False
    time.sleep(0.8)
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 503
    a.healthy = True
    time.sleep(0.8)
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
