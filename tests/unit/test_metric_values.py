"""Exact metric values after a scripted sequence of traffic: two 429s (queue full, queue timeout), one
upstream failure, one client disconnect per phase, one request naming a model no engine serves, and an
engine that goes down and comes back. Requests are ordered by polling observable state, never by sleeping."""
import asyncio

import httpx

from tests.support.fake_upstream import MODEL
from tests.support.probes import increments, samples, until

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
FAMILIES = ("leanserve_rejections", "leanserve_upstream_errors", "leanserve_client_disconnects",
            "leanserve_requests", "leanserve_engine_healthy")


def gauge(url, name):
    return sum(v for (n, _), v in samples(url, name).items() if n == name)


def test_exact_values_after_scripted_traffic(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_concurrency=1, max_queue=1, queue_timeout=0.5)
    url, post = gw.url, gw.url + "/v1/chat/completions"
    before = samples(url, *FAMILIES)
    healthy = ("leanserve_engine_healthy", (("replica", upstream.url),))
    assert before[healthy] == 1

    async def scripted():
        async with httpx.AsyncClient(timeout=30) as c:
            # 1. A request holds the only slot, waiting for its first token.
            holder = asyncio.create_task(c.post(post, json={**CHAT, "fake_first_token_delay": 30}))
            assert await until(lambda: upstream.active == 1)
            # 2. One waits in the queue; 3. the next finds the queue full (429 queue_full).
            queued = asyncio.create_task(c.post(post, json=CHAT))
            assert await until(lambda: gauge(url, "leanserve_requests_queued") == 1)
            full = await c.post(post, json=CHAT)
            # 4. The queued one gives up after queue_timeout (429 queue_timeout).
            late = await queued
            # 5. The holder's client leaves before the first token (phase "waiting").
            holder.cancel()
            assert await until(lambda: upstream.active == 0 and gauge(url, "leanserve_requests_in_flight") == 0)
            # 6. A client leaves mid-stream (phase "streaming").
            async with c.stream("POST", post, json={**CHAT, "max_tokens": 100, "fake_wait_gate": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        break  # the first token arrived; the second waits for the gate, which never opens
            assert await until(lambda: upstream.active == 0 and gauge(url, "leanserve_requests_in_flight") == 0)
            # 7. The engine fails (500); 8. a model nobody serves (404).
            failed = await c.post(post, json={**CHAT, "fake_status": 500})
            unknown = await c.post(post, json={**CHAT, "model": "no-such-model"})
            return full, late, failed, unknown

    full, late, failed, unknown = asyncio.run(scripted())
    assert (full.status_code, full.json()["error"]["code"]) == (429, "queue_full")
    assert (late.status_code, late.json()["error"]["code"]) == (429, "queue_timeout")
    assert failed.status_code == 500 and unknown.status_code == 404
    assert upstream.gate_timed_out == 0 and upstream.disconnects == 2

    assert increments(before, samples(url, *FAMILIES)) == {
        ("leanserve_rejections_total", (("reason", "queue_full"),)): 1,
        ("leanserve_rejections_total", (("reason", "queue_timeout"),)): 1,
        ("leanserve_upstream_errors_total", (("kind", "http_500"), ("replica", upstream.url))): 1,
        ("leanserve_client_disconnects_total", (("endpoint", "chat"), ("phase", "waiting"))): 1,
        ("leanserve_client_disconnects_total", (("endpoint", "chat"), ("phase", "streaming"))): 1,
        ("leanserve_requests_total", (("endpoint", "chat"), ("model", MODEL), ("status", "429"))): 2,
        ("leanserve_requests_total", (("endpoint", "chat"), ("model", MODEL), ("status", "499"))): 2,
        ("leanserve_requests_total", (("endpoint", "chat"), ("model", MODEL), ("status", "500"))): 1,
        ("leanserve_requests_total", (("endpoint", "chat"), ("model", "unknown"), ("status", "404"))): 1,
    }
    # The engine goes down, then comes back: the gauge follows the health probes.
    upstream.healthy = False
    assert asyncio.run(until(lambda: samples(url, "leanserve_engine_healthy")[healthy] == 0))
    upstream.healthy = True
    assert asyncio.run(until(lambda: samples(url, "leanserve_engine_healthy")[healthy] == 1))
