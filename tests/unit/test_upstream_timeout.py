"""An engine that goes silent for longer than upstream_timeout: 504 before anything reached the client
(and a retry on another replica), an error event once the stream has started; the engine is closed
(vLLM would abort the request) and not marked down for being slow."""
import httpx

from tests.support.fake_upstream import MODEL, FakeUpstream
from tests.support.probes import metric, wait_for
from tests.unit.sse import events

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
SILENT = 0.3  # upstream_timeout of these gateways, in seconds; the fakes stay silent for 30


def timeouts(gw, replica):
    return metric(gw.url, "leanserve_upstream_errors_total", replica=replica.url, kind="timeout")


def test_silent_engine_is_504_and_stays_healthy(upstream, make_gateway):
    gw = make_gateway([upstream.url], upstream_timeout=SILENT)
    for stream in (False, True):
        r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": stream, "fake_first_token_delay": 30},
                       timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "engine_timeout", r.text
    assert wait_for(lambda: upstream.disconnects == 2 and upstream.active == 0)  # both closed, not left running
    assert timeouts(gw, upstream) == 2
    assert httpx.get(gw.url + "/ready").json()["engines"][0]["healthy"] is True


def test_silence_mid_stream_is_an_error_event_then_done(upstream, make_gateway):
    gw = make_gateway([upstream.url], upstream_timeout=SILENT)
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True, "fake_stall_after": 2}, timeout=30)
    assert r.status_code == 200
    ev = events(r.text)
    assert [e["choices"][0]["delta"]["content"] for e in ev[:2]] == ["tok0 ", "tok1 "]
    assert ev[2]["error"]["code"] == "engine_timeout" and ev[3] == "[DONE]" and len(ev) == 4
    assert wait_for(lambda: upstream.disconnects == 1 and upstream.active == 0)
    assert len(upstream.requests) == 1  # tokens had reached the client: no retry


def test_silent_replica_is_retried_on_another(serve_app, make_gateway):
    silent = serve_app(FakeUpstream(first_token_delay=30))
    ok = serve_app(FakeUpstream())
    gw = make_gateway([silent.url, ok.url], upstream_timeout=SILENT)  # ties go to the first listed
    for stream in (False, True):
        r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": stream}, timeout=30)
        assert r.status_code == 200, r.text
    assert len(silent.requests) == 2 and len(ok.requests) == 2
    assert timeouts(gw, silent) == 2 and timeouts(gw, ok) == 0
    assert wait_for(lambda: silent.disconnects == 2)
