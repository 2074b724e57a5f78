"""Least-in-flight routing over healthy replicas; failover only while nothing reached the client."""
import asyncio

import httpx

from tests.support.fake_upstream import MODEL
from tests.support.probes import until, wait_for
from tests.support.servers import free_port

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_least_in_flight_spreads_concurrent_requests(make_upstream, make_gateway):
    a, b = make_upstream(), make_upstream()
    gw = make_gateway([a.url, b.url])

    async def burst():
        async with httpx.AsyncClient(timeout=30) as c:
            held = {**CHAT, "stream": True, "fake_wait_gate": True}  # each stays in flight until the gates open
            tasks = [asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=held)) for _ in range(6)]
            assert await until(lambda: a.active + b.active == 6)
            spread = (a.active, b.active)
            a.gate.set()
            b.gate.set()
            rs = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 for r in rs)
        return spread
    assert asyncio.run(burst()) == (3, 3)
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


def health(gw) -> list[bool]:
    return [e["healthy"] for e in httpx.get(gw.url + "/ready").json()["engines"]]


def test_health_probes_track_replicas(make_upstream, make_gateway):
    a, b = make_upstream(), make_upstream()
    gw = make_gateway([a.url, b.url])
    a.healthy = False
    assert wait_for(lambda: health(gw) == [False, True])
    for _ in range(4):
        assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
    assert len(a.requests) == 0 and len(b.requests) == 4
    a.healthy = False
    b.healthy = False
    assert wait_for(lambda: health(gw) == [False, False])
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 503
    a.healthy = True
    assert wait_for(lambda: health(gw) == [True, False])
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
