"""The gateway in front of a real vLLM CPU engine serving the default model, driven by the OpenAI SDK:
requests, streams, errors, metrics; a client that leaves while queued, before the first token or
mid-stream; an engine that stays silent past the upstream timeout, and a retry that lands on vLLM."""
import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL
from tests.support.fake_upstream import FakeUpstream
from tests.support.probes import metric, samples, until, wait_for

pytestmark = pytest.mark.integration
Q = [{"role": "user", "content": "What is the capital of France?"}]
LONG_STORY = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
              "max_tokens": 2000, "stream": True, "ignore_eos": True}


def by_name(url: str) -> dict[str, float]:
    """Every sample on url/metrics, summed over labels."""
    out: dict[str, float] = {}
    for (name, _), v in samples(url).items():
        out[name] = out.get(name, 0.0) + v
    return out


def running(engine_url: str) -> float:
    return metric(engine_url, "vllm:num_requests_running")


# Upper bound for vLLM to settle (an abort takes effect at its next step): generous, since a step can take
# seconds when other jobs share the 2 cores. A bound on waiting, not a measured property.
SETTLE = 180


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", timeout=120)


def test_models_lists_default(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=24)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    text, usage, n_chunks = "", None, 0
    for chunk in stream:
        n_chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert "Paris" in text and n_chunks > 3
    assert usage is not None and usage.completion_tokens >= 3


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].text


def test_eight_concurrent(served):
    async def run():
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", timeout=300)
        rs = await asyncio.gather(*[
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}],
                                      max_tokens=16, temperature=0) for i in range(8)])
        await c.close()
        return rs
    rs = asyncio.run(run())
    assert len(rs) == 8 and all(r.choices[0].message.content for r in rs)


def test_engine_error_relayed_in_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=Q, max_tokens=10**6)
    assert e.value.status_code == 400 and e.value.body["message"]


def test_disconnect_mid_stream_aborts_in_vllm(served):
    assert wait_for(lambda: running(served.engine_url) == 0, SETTLE)
    left = metric(served.url, "leanserve_client_disconnects_total", phase="streaming")
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=LONG_STORY, timeout=60) as r:
        got, lines = 0, r.iter_lines()  # kept referenced: a collected iterator closes the connection at once
        for line in lines:
            got += line.startswith("data:")
            if got >= 5:
                break
        # vLLM's gauges trail its steps: wait for the figure rather than read it once.
        assert wait_for(lambda: running(served.engine_url) == 1, SETTLE)
        assert metric(served.url, "leanserve_requests_in_flight") == 1  # the client is still there
    assert wait_for(lambda: running(served.engine_url) == 0, SETTLE), "vLLM kept generating for a client that left"
    assert wait_for(lambda: metric(served.url, "leanserve_client_disconnects_total", phase="streaming") == left + 1)


def test_disconnect_while_queued_never_reaches_vllm(served, make_gateway):
    """A gateway with one slot in front of the real engine: the queued client leaves, its place is freed,
    the engine only ever ran the request holding the slot, and nothing is left running."""
    gw = make_gateway([served.engine_url], max_concurrency=1)
    post = gw.url + "/v1/chat/completions"
    assert wait_for(lambda: running(served.engine_url) == 0, SETTLE)

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as c:
            async with c.stream("POST", post, json=LONG_STORY) as holder:
                assert holder.status_code == 200
                lines = holder.aiter_lines()  # kept referenced: a collected iterator would close the stream
                async for line in lines:
                    if line.startswith("data:"):
                        break  # generating in vLLM now
                queued = asyncio.create_task(c.post(post, json={**LONG_STORY, "stream": False}))
                assert await until(lambda: metric(gw.url, "leanserve_requests_queued") == 1)
                assert await until(lambda: running(served.engine_url) == 1, SETTLE)
                queued.cancel()
                assert await until(lambda: metric(gw.url, "leanserve_requests_queued") == 0)
                assert await until(lambda: running(served.engine_url) == 1
                                   and metric(served.engine_url, "vllm:num_requests_waiting") == 0, SETTLE)
            # the holder's client leaves too (mid-stream)
    asyncio.run(scenario())
    assert wait_for(lambda: running(served.engine_url) == 0, SETTLE)
    assert metric(gw.url, "leanserve_client_disconnects_total", phase="waiting") == 1
    assert metric(gw.url, "leanserve_client_disconnects_total", phase="streaming") == 1
    assert metric(gw.url, "leanserve_requests_in_flight") == 0


def long_prompt(engine_url: str, tokens: int = 6000) -> list[dict]:
    """A user message of about `tokens` tokens (WikiText-2 text): its prefill keeps vLLM CPU busy for a while."""
    text = (Path(__file__).resolve().parents[2] / "data" / "wikitext2" / "valid.txt").read_text()[: tokens * 4]
    msgs = [{"role": "user", "content": "Summarise:\n" + text}]
    while True:
        r = httpx.post(engine_url + "/tokenize", json={"model": MODEL, "messages": msgs}, timeout=60)
        if r.json()["count"] <= tokens:
            return msgs
        msgs[0]["content"] = msgs[0]["content"][: int(len(msgs[0]["content"]) * 0.9)]


def test_disconnect_before_the_first_token_aborts_in_vllm(served):
    """The client leaves while vLLM is still prefilling a long prompt: the gateway has sent nothing yet
    (phase "waiting") and vLLM aborts the request."""
    body = {**LONG_STORY, "messages": long_prompt(served.engine_url), "max_tokens": 64}
    assert wait_for(lambda: running(served.engine_url) == 0, SETTLE)
    waiting = metric(served.url, "leanserve_client_disconnects_total", phase="waiting")

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as c:
            req = asyncio.create_task(c.post(served.url + "/v1/chat/completions", json=body))
            assert await until(lambda: running(served.engine_url) == 1, SETTLE)
            req.cancel()
    asyncio.run(scenario())
    assert wait_for(lambda: running(served.engine_url) == 0, SETTLE), "vLLM kept the request of a client that left"
    assert wait_for(lambda: metric(served.url, "leanserve_client_disconnects_total", phase="waiting") == waiting + 1)


def test_silent_engine_is_504_and_vllm_aborts(served, make_gateway):
    """A non-streaming request sends nothing until its last token: longer than upstream_timeout here."""
    gw = make_gateway([served.engine_url], upstream_timeout=1.0)
    assert wait_for(lambda: running(served.engine_url) == 0, SETTLE)
    r = httpx.post(gw.url + "/v1/chat/completions", json={**LONG_STORY, "stream": False, "max_tokens": 400},
                   timeout=120)
    assert r.status_code == 504 and r.json()["error"]["code"] == "engine_timeout", r.text
    assert metric(gw.url, "leanserve_upstream_errors_total", kind="timeout") == 1
    assert wait_for(lambda: running(served.engine_url) == 0, SETTLE), "the timed-out request kept running in vLLM"
    assert httpx.get(gw.url + "/ready").status_code == 200  # slow is not down


def test_silent_replica_is_retried_on_the_real_engine(served, serve_app, make_gateway):
    silent = serve_app(FakeUpstream(model=MODEL, first_token_delay=600))
    # Long enough for vLLM's first chunk on busy cores; ties go to the first listed replica.
    gw = make_gateway([silent.url, served.engine_url], upstream_timeout=30.0)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", timeout=300, max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=Q, temperature=0, max_tokens=24, stream=True)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(silent.requests) == 1
    assert metric(gw.url, "leanserve_upstream_errors_total", replica=silent.url, kind="timeout") == 1


def test_metrics_after_traffic(served, client):
    client.chat.completions.create(model=MODEL, messages=Q, max_tokens=4, stream=False)
    list(client.chat.completions.create(model=MODEL, messages=Q, max_tokens=4, stream=True))
    s = by_name(served.url)
    for name in ("leanserve_requests_total", "leanserve_time_to_first_token_seconds_count",
                 "leanserve_inter_token_latency_seconds_count", "leanserve_e2e_request_latency_seconds_count",
                 "leanserve_queue_wait_seconds_count", "leanserve_prompt_tokens_total",
                 "leanserve_completion_tokens_total", "leanserve_finished_choices_total"):
        assert s.get(name, 0) > 0, name
    assert s["leanserve_requests_in_flight"] == 0
