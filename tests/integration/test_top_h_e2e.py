"""Top-H through the gateway on the real vLLM CPU engine (old model runner → TopHV1)."""
import openai
import pytest

from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration
PROMPTS = ["Once upon a time", "The three most important inventions are", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", timeout=120)


def complete(client, prompt, **kw):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, **kw)
    return r.choices[0].text


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tiny_alpha_equals_greedy(client, prompt):
    greedy = complete(client, prompt, temperature=0)
    assert complete(client, prompt, temperature=1.5, seed=11, extra_body={"top_h": 1e-6}) == greedy


@pytest.mark.parametrize("prompt", PROMPTS)
def test_alpha_one_equals_plain_sampling(client, prompt):
    plain = complete(client, prompt, temperature=1.5, seed=11)
    assert complete(client, prompt, temperature=1.5, seed=11, extra_body={"top_h": 1.0}) == plain


def test_top_h_changes_high_temperature_sampling(client):
    outs = [complete(client, p, temperature=2.0, seed=5, extra_body={"top_h": 0.4}) for p in PROMPTS]
    plain = [complete(client, p, temperature=2.0, seed=5) for p in PROMPTS]
    assert outs != plain


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, "0.4", True])
def test_bad_alpha_is_400_at_the_gateway(client, alpha):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "x", extra_body={"top_h": alpha})
    assert e.value.body["param"] == "top_h"


def test_bad_alpha_in_vllm_xargs_is_400_from_the_engine(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, "x", extra_body={"vllm_xargs": {"top_h": 2.0}})
    assert "top_h must be a number in (0, 1]" in e.value.body["message"]
