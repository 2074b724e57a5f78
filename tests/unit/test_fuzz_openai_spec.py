"""Fuzzing with schemathesis against OpenAI's own OpenAPI document (data/openai/, chat and completions): bodies
the spec allows and bodies it forbids, sent to the gateway in front of the fake engine. Whatever arrives:
no 5xx, and every error in OpenAI's shape. 4 x 260 = 1,040 bodies (more than 1,000)."""
import json
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.support.fake_upstream import MODEL

SPEC = Path(__file__).resolve().parents[2] / "data" / "openai" / "openapi-chat-completions.yaml"
EXAMPLES = 260
MAX_TOKENS = ("max_tokens", "max_completion_tokens")
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def schema():
    return schemathesis.openapi.from_path(SPEC)


def body_for(case) -> bytes:
    b = case.body
    if isinstance(b, dict):
        b = dict(b)
        if isinstance(b.get("model"), str):
            b["model"] = MODEL  # reach the engine, not only model_not_found
        for k in MAX_TOKENS:  # the fake streams max_tokens tokens: keep each case quick
            if isinstance(b.get(k), int) and not isinstance(b.get(k), bool) and b[k] > 8:
                b[k] = 8
        b.pop("n", None) if isinstance(b.get("n"), int) and b["n"] > 4 else None
    try:
        return json.dumps(b, allow_nan=False).encode()
    except (TypeError, ValueError):
        return b"{}"


def check(r: httpx.Response, path: str) -> None:
    assert r.status_code < 500, (path, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json().get("error")
        assert isinstance(err, dict) and set(err) == ERROR_KEYS and isinstance(err["message"], str), r.text[:500]
        assert isinstance(err["type"], str)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
        for line in r.text.split("\n\n"):
            if line.startswith("data: {") and '"error"' in line[:20]:
                raise AssertionError(f"error event in a fuzzed stream: {line[:300]}")
    else:
        assert isinstance(r.json(), dict)


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_fuzzed_bodies_never_5xx(schema, upstream, make_gateway, path, mode):
    gw = make_gateway([upstream.url])
    sent = []
    with httpx.Client(base_url=gw.url + "/v1", timeout=30) as client:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=schema[path]["POST"].as_strategy(generation_mode=mode))
        def fuzz(case):
            raw = body_for(case)
            sent.append(raw)
            check(client.post(path, content=raw, headers={"content-type": "application/json"}), path)
        fuzz()
    assert len(sent) >= EXAMPLES * 0.9  # hypothesis may stop early only when it runs out of distinct cases

