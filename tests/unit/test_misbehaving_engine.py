"""One test per way an engine (or a proxy in front of it) misbehaves: the client always gets an OpenAI-shaped
error or a clean stream ending (error event + [DONE]) within the configured deadline, the gateway never
answers 500, and a healthy second replica serves the retry where nothing reached the client yet."""
import httpx
import pytest

from tests.support.fake_upstream import MODEL
from tests.support.misbehaving_engine import MisbehavingEngine
from tests.support.probes import metric, wait_for
from tests.unit.sse import events

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
SHORT = 0.3  # the deadline under test, seconds; the bad engines would hold on forever
HANG_GUARD = 20  # httpx timeout: only there so that a regression fails instead of hanging


@pytest.fixture
def bad_engine():
    engines = []

    def make(mode: str, models=None) -> MisbehavingEngine:
        e = MisbehavingEngine(mode, models).start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop()


def post(gw, body: dict) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=HANG_GUARD)


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    if code is not None:
        assert err["code"] == code, err
    return err


def texts(r: httpx.Response) -> list:
    return [e if e == "[DONE]" else (e.get("error") or e["choices"][0]["delta"].get("content"))
            for e in events(r.text)]


# ---- stalls ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["stall_before_headers", "stall_after_headers"])
def test_no_first_token_is_504_and_the_engine_is_released(bad_engine, make_gateway, mode):
    bad = bad_engine(mode)
    gw = make_gateway([bad.url], upstream_first_token_timeout=SHORT)
    assert_openai_error(post(gw, {**CHAT, "stream": True}), 504, "engine_timeout")
    assert wait_for(lambda: bad.closed == 1)  # the gateway closed it: vLLM would abort the request
    assert httpx.get(gw.url + "/ready").json()["engines"][0]["healthy"] is True  # slow is not down


@pytest.mark.parametrize("mode", ["stall_before_headers", "stall_after_headers"])
def test_no_first_token_is_served_by_a_healthy_replica(bad_engine, upstream, make_gateway, mode):
    bad = bad_engine(mode)
    gw = make_gateway([bad.url, upstream.url], upstream_first_token_timeout=SHORT)  # ties go to the first
    r = post(gw, {**CHAT, "stream": True})
    assert r.status_code == 200 and texts(r)[-1] == "[DONE]" and len(upstream.requests) == 1


def test_non_streaming_stall_hits_the_total_deadline(bad_engine, make_gateway):
    bad = bad_engine("stall_before_headers")
    gw = make_gateway([bad.url], upstream_total_timeout=SHORT)
    err = assert_openai_error(post(gw, CHAT), 504, "engine_timeout")
    assert "total" in err["message"]


def test_total_deadline_bounds_all_attempts_together(bad_engine, make_gateway):
    bads = [bad_engine("stall_before_headers") for _ in range(3)]
    gw = make_gateway([b.url for b in bads], upstream_total_timeout=SHORT, upstream_first_token_timeout=SHORT)
    assert_openai_error(post(gw, {**CHAT, "stream": True}), 504, "engine_timeout")
    assert len(bads[0].requests) == 1 and sum(len(b.requests) for b in bads) == 1  # no time left to retry


def test_stall_mid_stream_ends_with_an_error_event_then_done(bad_engine, make_gateway):
    bad = bad_engine("stall_mid_stream")
    gw = make_gateway([bad.url], upstream_total_timeout=SHORT)
    r = post(gw, {**CHAT, "stream": True})
    assert r.status_code == 200
    got = texts(r)
    assert got[:2] == ["tok0 ", "tok1 "] and got[2]["code"] == "engine_timeout" and got[3] == "[DONE]"
    assert wait_for(lambda: bad.closed == 1)


# ---- protocol errors ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["garbage", "huge_header", "huge_event"])
def test_protocol_garbage_is_502(bad_engine, make_gateway, mode):
    gw = make_gateway([bad_engine(mode).url])
    for stream in (False, True):
        if mode == "huge_event" and not stream:
            continue
        assert_openai_error(post(gw, {**CHAT, "stream": stream}), 502, "engine_protocol_error")


@pytest.mark.parametrize("mode", ["garbage", "huge_header", "html_502", "close_before_events", "close_before_headers"])
def test_broken_replica_is_retried_on_a_healthy_one(bad_engine, upstream, make_gateway, mode):
    bad = bad_engine(mode)
    gw = make_gateway([bad.url, upstream.url])
    for stream in (False, True):
        r = post(gw, {**CHAT, "stream": stream})
        assert r.status_code == 200, r.text
    assert len(upstream.requests) == 2 and len(bad.requests) >= 1


def test_close_before_answering_is_503_and_not_engine_down(bad_engine, make_gateway):
    gw = make_gateway([bad_engine("close_before_headers").url], health_interval=60)
    assert_openai_error(post(gw, CHAT), 503, "engine_unavailable")
    assert httpx.get(gw.url + "/ready").json()["engines"][0]["healthy"] is True  # it answers its probes


def test_html_502_alone_is_an_openai_shaped_502(bad_engine, make_gateway):
    gw = make_gateway([bad_engine("html_502").url])
    err = assert_openai_error(post(gw, CHAT), 502)
    assert err["type"] == "server_error"


def test_non_json_200_is_502_not_relayed_as_json(bad_engine, make_gateway):
    gw = make_gateway([bad_engine("non_json_200").url])
    assert_openai_error(post(gw, CHAT), 502, "engine_protocol_error")


def test_close_mid_stream_ends_with_an_error_event_then_done(bad_engine, make_gateway):
    gw = make_gateway([bad_engine("close_mid_stream").url])
    r = post(gw, {**CHAT, "stream": True})
    got = texts(r)
    assert r.status_code == 200 and got[:2] == ["tok0 ", "tok1 "]
    assert got[2]["code"] == "engine_error" and got[3] == "[DONE]" and len(got) == 4


@pytest.mark.parametrize("mode", ["gzip", "crlf_sse", "string_usage", "ok"])
def test_legal_but_unusual_answers_are_relayed_intact(bad_engine, make_gateway, mode):
    gw = make_gateway([bad_engine(mode).url])
    r = post(gw, {**CHAT, "stream": True})
    assert r.status_code == 200 and texts(r) == ["tok0 ", "tok1 ", "tok2 ", "[DONE]"], r.text
    r = post(gw, CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    if mode != "string_usage":
        assert metric(gw.url, "leanserve_prompt_tokens_total") == 14


def test_gateway_asks_engines_for_identity_encoding(bad_engine, make_gateway):
    engine = bad_engine("ok")
    gw = make_gateway([engine.url])
    assert post(gw, CHAT).status_code == 200
    assert engine.headers[-1].get("accept-encoding") == "identity"


# ---- health probes --------------------------------------------------------------------------
@pytest.mark.parametrize("models", [{"data": None}, {"data": "x"}, [1, 2], b"not json", {"nodata": 1}])
def test_bad_models_answer_marks_down_and_probing_goes_on(bad_engine, make_gateway, models):
    bad = bad_engine("ok", models=models)
    gw = make_gateway([bad.url])
    ready = lambda: httpx.get(gw.url + "/ready").status_code  # noqa: E731
    assert wait_for(lambda: metric(gw.url, "leanserve_engine_probe_failures_total") >= 2)
    assert ready() == 503
    bad.models = None  # the engine recovers: the next probe routes to it again
    assert wait_for(lambda: ready() == 200)
    assert post(gw, CHAT).status_code == 200


def test_non_dict_model_entries_are_ignored(bad_engine, make_gateway):
    bad = bad_engine("ok", models={"data": ["junk", 5, None, {"no_id": 1}, {"id": MODEL}]})
    gw = make_gateway([bad.url])
    assert wait_for(lambda: httpx.get(gw.url + "/ready").status_code == 200)
    assert [m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]] == [MODEL]
    assert post(gw, CHAT).status_code == 200
    assert post(gw, {**CHAT, "model": "other"}).status_code == 404


# ---- the trimmed relay runs under the same deadlines ----------------------------------------
def test_trimmed_request_stalling_mid_stream_ends_with_an_error_event(bad_engine, make_gateway):
    gw = make_gateway([bad_engine("stall_mid_stream").url], upstream_total_timeout=SHORT)
    r = post(gw, {**CHAT, "stream": True, "trim": True})
    got = texts(r)
    assert r.status_code == 200 and got[:2] == ["tok0 ", "tok1 "]
    assert got[2]["code"] == "engine_timeout" and got[3] == "[DONE]"


def test_trimmed_request_without_a_first_token_is_504(bad_engine, make_gateway):
    gw = make_gateway([bad_engine("stall_after_headers").url], upstream_first_token_timeout=SHORT)
    for stream in (True, False):
        assert_openai_error(post(gw, {**CHAT, "stream": stream, "trim": True}), 504, "engine_timeout")
