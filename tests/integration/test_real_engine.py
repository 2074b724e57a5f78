"""The gateway in front of a real vLLM CPU engine serving the default model, driven by the OpenAI SDK."""
import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration
Q = [{"role": "user", "content": "What is the capital of France?"}]


def samples(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


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
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 2000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data:")
            if got >= 5:
                break
        assert samples(served.engine_url)["vllm:num_requests_running"] == 1
    t0 = time.monotonic()
    while samples(served.engine_url)["vllm:num_requests_running"] != 0:
        assert time.monotonic() - t0 < 15, "vLLM kept generating for a client that left"
        time.sleep(0.2)


def test_metrics_after_traffic(served, client):
    client.chat.completions.create(model=MODEL, messages=Q, max_tokens=4, stream=False)
    list(client.chat.completions.create(model=MODEL, messages=Q, max_tokens=4, stream=True))
    s = samples(served.url)
    for name in ("leanserve_requests_total", "leanserve_time_to_first_token_seconds_count",
                 "leanserve_inter_token_latency_seconds_count", "leanserve_e2e_request_latency_seconds_count",
                 "leanserve_queue_wait_seconds_count", "leanserve_prompt_tokens_total",
                 "leanserve_completion_tokens_total", "leanserve_finished_choices_total"):
        assert s.get(name, 0) > 0, name
    assert s["leanserve_requests_in_flight"] == 0
