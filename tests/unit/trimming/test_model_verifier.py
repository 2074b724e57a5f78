"""The `model` verifier: batched prefill-only Yes/No calls, read as P(Yes); failures are no decision."""
import asyncio
import math
import threading

import aiohttp
import httpx
import pytest

from server.trimming.model_verifier import ModelVerifier, p_yes
from tests.support.servers import free_port
from tests.support.thinking_upstream import MODEL, ThinkingUpstream, pieces
from tests.support.probes import metric, until
from tests.unit.trimming.test_stream import ANSWER, CHAT, CLOSE, THOUGHTS, marker_index, stream, text_of

STEP_YES = "Then the total is 8. So the answer is 8."
STEP_NO = "Let me expand the product first."


@pytest.fixture
def fake(serve_app):
    return serve_app(ThinkingUpstream(["<think>", "x", "</think>"]))


def run(fn, url, **kw):
    async def go():
        async with aiohttp.ClientSession() as client:
            return await fn(ModelVerifier(client, url, MODEL, **kw))
    return asyncio.run(go())


def test_p_yes_reads_the_yes_no_share():
    assert p_yes({" Yes": math.log(0.6), " No": math.log(0.2), " The": math.log(0.1)}) == pytest.approx(0.75)
    assert p_yes({"yes": math.log(0.3), "YES": math.log(0.3), "no": math.log(0.2)}) == pytest.approx(0.75)
    assert p_yes({" Maybe": -0.1}) is None
    assert p_yes(None) is None and p_yes([]) is None


def test_concurrent_questions_go_out_as_one_batch(fake):
    async def scenario(v):
        return await asyncio.gather(v.answers([STEP_YES, STEP_NO], "What is 3 + 5?"),
                                    v.answers([STEP_NO]), v.answers([STEP_YES]))

    a, b, c = run(scenario, fake.url, batch_window=0.05)
    assert a == ["8", None] and b == [None] and c == ["8"]
    assert len(fake.verifier_requests) == 1
    req = fake.verifier_requests[0]
    assert len(req["prompt"]) == 4 and req["max_tokens"] == 1 and req["logprobs"] == 5 and req["model"] == MODEL
    assert "What is 3 + 5?" in req["prompt"][0] and req["prompt"][0].endswith("Answer:")


def test_max_batch_splits_batches(fake):
    run(lambda v: v.answers([STEP_YES] * 5), fake.url, max_batch=2, batch_window=0.05)
    assert sorted(len(r["prompt"]) for r in fake.verifier_requests) == [1, 2, 2]


def test_yes_without_an_extractable_answer_uses_the_last_sentence(fake):
    fake.judge = lambda prompt: 0.9
    out = run(lambda v: v.answers(["I computed it all. It comes out as seven apples."]), fake.url)
    assert out == ["It comes out as seven apples."]


def test_agreements_ask_only_what_the_rules_cannot_settle(fake):
    out = run(lambda v: v.agreements([("5", "5.0"), ("seven", "7"), ("x = 2", "two")]), fake.url)
    assert out == [True, False, False]  # the fake judge agrees only on identical strings
    assert len(fake.verifier_requests) == 1 and len(fake.verifier_requests[0]["prompt"]) == 2
    fake.judge = lambda prompt: 0.8
    assert run(lambda v: v.agreements([("seven", "7")]), fake.url) == [True]


def test_timeout_is_no_decision(fake):
    fake.verifier_gate = threading.Event()  # never set while the verifier waits: the judge never answers
    out = run(lambda v: v.answers([STEP_YES]), fake.url, timeout=0.3)
    assert out == [None] and len(fake.verifier_requests) == 1
    assert fake.verifier_answered == 0  # it gave up on its own, it did not wait for an answer
    fake.verifier_gate.set()


@pytest.mark.parametrize("status", [500, 400])
def test_http_error_is_no_decision(fake, status):
    fake.verifier_status = status
    assert run(lambda v: v.answers([STEP_YES]), fake.url) == [None]
    assert run(lambda v: v.agreements([("a", "b")]), fake.url) == [False]


def test_unreachable_verifier_is_no_decision():
    assert run(lambda v: v.answers([STEP_YES]), f"http://127.0.0.1:{free_port()}") == [None]


def test_a_cancelled_caller_leaves_the_batch_to_the_others(fake):
    fake.verifier_gate = threading.Event()

    async def scenario(v):
        gone = asyncio.ensure_future(v.answers([STEP_YES]))
        stays = asyncio.ensure_future(v.answers([STEP_YES]))
        assert await until(lambda: len(fake.verifier_requests) == 1)  # the batch is out, unanswered
        gone.cancel()
        await asyncio.sleep(0)
        fake.verifier_gate.set()
        return await stays, gone.cancelled() or gone.exception() is None

    assert run(scenario, fake.url, batch_window=0.02) == (["8"], True)


# ---- through the gateway ----------------------------------------------------------------------------
@pytest.fixture
def thinker(serve_app):
    return serve_app(ThinkingUpstream(pieces("<think>" + "".join(THOUGHTS) + "</think>\n\nThe answer is 5."),
                                      delay=0.01))


def test_gateway_asks_the_serving_engine(thinker, make_gateway):
    gw = make_gateway([thinker.url])
    evs = stream(gw, {**CHAT, "trim": {"verifier": "model"}})
    kept = "<think>" + "".join(THOUGHTS[:5])
    assert thinker.requests[1]["messages"][-1]["content"] == kept + CLOSE
    assert text_of(evs) == kept + CLOSE + "".join(ANSWER)
    assert thinker.verifier_requests and all(r["model"] == MODEL for r in thinker.verifier_requests)
    assert metric(gw.url, "leanserve_trim_verifier_seconds_count", verifier="model") > 0


def test_gateway_uses_a_configured_verifier_endpoint(thinker, fake, make_gateway):
    gw = make_gateway([thinker.url], trim_verifier_url=fake.url + "/", trim_verifier_model="judge")
    evs = stream(gw, {**CHAT, "trim": {"verifier": "model"}})
    assert marker_index(evs) >= 0
    assert not thinker.verifier_requests and fake.verifier_requests
    assert {r["model"] for r in fake.verifier_requests} == {"judge"}


def test_a_broken_verifier_only_means_no_cut(thinker, make_gateway):
    thinker.verifier_status = 500
    gw = make_gateway([thinker.url])
    evs = stream(gw, {**CHAT, "trim": {"verifier": "model"}})
    assert len(thinker.requests) == 1
    assert text_of(evs) == "<think>" + "".join(THOUGHTS) + "</think>\n\nThe answer is 5."
    assert httpx.get(gw.url + "/health").status_code == 200
