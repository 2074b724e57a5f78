"""A client that leaves makes the gateway close the upstream request (the fake engine sees the close)."""
import asyncio

import httpx

from tests.support.fake_upstream import MODEL
from tests.support.probes import metric, until, wait_for

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_disconnect_mid_stream_aborts_upstream(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    with httpx.stream("POST", gw.url + "/v1/chat/completions",
                      json={**CHAT, "max_tokens": 1000, "fake_token_delay": 0.05}) as r:
        lines = r.iter_lines()
        got = [line for _, line in zip(range(6), lines)]
        assert any("tok0" in line for line in got)
    assert wait_for(lambda: upstream.disconnects == 1 and upstream.active == 0)
    assert upstream.completed == 0
    assert wait_for(lambda: metric(gw.url, "leanserve_client_disconnects_total") == 1)
    assert metric(gw.url, "leanserve_requests_in_flight") == 0


def leave_once_upstream_has_it(gw, upstream, body):
    """The client sends the request and goes away once the engine is working on it."""
    async def scenario():
        async with httpx.AsyncClient(timeout=30) as c:
            req = asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json=body))
            assert await until(lambda: upstream.active == 1)
            req.cancel()
    asyncio.run(scenario())


def test_disconnect_before_first_token_aborts_upstream(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    leave_once_upstream_has_it(gw, upstream, {**CHAT, "fake_first_token_delay": 30})
    assert wait_for(lambda: upstream.disconnects == 1 and upstream.active == 0)
    assert wait_for(lambda: metric(gw.url, "leanserve_client_disconnects_total", phase="waiting") == 1)


def test_disconnect_non_stream_aborts_upstream(upstream, make_gateway):
    gw = make_gateway([upstream.url])
    leave_once_upstream_has_it(gw, upstream, {**CHAT, "stream": False, "fake_first_token_delay": 30})
    assert wait_for(lambda: upstream.disconnects == 1 and upstream.active == 0)


def test_disconnect_while_queued_frees_the_place(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_concurrency=1, max_queue=4)

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as c:
            hold = asyncio.create_task(c.post(gw.url + "/v1/chat/completions",
                                              json={**CHAT, "max_tokens": 2, "fake_wait_gate": True}))
            assert await until(lambda: upstream.active == 1)
            queued = asyncio.create_task(c.post(gw.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}))
            assert await until(lambda: metric(gw.url, "leanserve_requests_queued") == 1)
            queued.cancel()  # the client leaves while queued
            assert await until(lambda: metric(gw.url, "leanserve_requests_queued") == 0)
            upstream.gate.set()
            r = await hold
            assert r.status_code == 200
    asyncio.run(scenario())
    assert len(upstream.requests) == 1  # the one that left never reached the engine
    assert metric(gw.url, "leanserve_requests_in_flight") == 0
