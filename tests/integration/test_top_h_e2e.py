"""Top-H through the gateway on the real vLLM CPU engine (old model runner → TopHV1): limits, errors, and
8 concurrent requests with different alphas checked token by token against the reference."""
import asyncio

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


# ---- under concurrency, intermediate alphas: every sampled token in the reference's kept set ------------------
ALPHAS = (0.2, 0.4, 0.6, 0.8)
TOP = 20  # logprobs per position (vLLM's default --max-logprobs)
N_TOKENS = 16
CONCURRENT_PROMPTS = ["Once upon a time", "The three most important inventions are"]
BAND = 0.01  # alpha +- BAND: HF and vLLM logits differ in the last float32 bits; a wrong alpha is >= 0.2 away


@pytest.fixture(scope="module")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels.model_prep import default_model_dir
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    return tok, model


def test_eight_concurrent_alphas_sample_inside_the_reference_kept_set(served, hf_model):
    """8 seeded requests at once (4 alphas x 2 prompts, T = 1) with the top 20 logprobs. The engine runs with
    --logprobs-mode processed_logprobs, so each position's logprobs are those it sampled from, after Top-H:
    the tokens with a finite logprob are vLLM's kept set (all of it when it has fewer than 20 tokens).
    For every position, against kernels/top_h/reference.py on the same prefix (HF logits): the sampled token
    is kept, and vLLM's kept set lies between the reference's sets at alpha - BAND and alpha + BAND."""
    import torch

    from kernels.top_h.reference import top_h_keep_row

    tok, model = hf_model
    jobs = [(p, a, 100 + i) for i, (p, a) in enumerate((p, a) for p in CONCURRENT_PROMPTS for a in ALPHAS)]
    prompts = {p: tok(p, add_special_tokens=False)["input_ids"] for p in CONCURRENT_PROMPTS}

    async def run():
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", timeout=300)
        try:
            return await asyncio.gather(*[
                c.completions.create(model=MODEL, prompt=prompts[p], max_tokens=N_TOKENS, temperature=1.0, seed=seed,
                                     logprobs=TOP, extra_body={"top_h": a, "return_token_ids": True, "ignore_eos": True,
                                                               "return_tokens_as_token_ids": True})
                for p, a, seed in jobs])
        finally:
            await c.close()

    responses = asyncio.run(run())
    checked = fitted = 0
    problems = []
    for (p, a, _), r in zip(jobs, responses):
        choice = r.choices[0]
        gen = choice.token_ids
        assert len(gen) == N_TOKENS
        with torch.no_grad():
            logits = model(torch.tensor([prompts[p] + gen])).logits[0, len(prompts[p]) - 1:-1]
        for j, (token, top) in enumerate(zip(gen, choice.logprobs.top_logprobs)):
            finite = {int(k.split(":")[1]) for k, v in top.items() if v > -9999.0}  # "token_id:123"
            lo = set(torch.nonzero(top_h_keep_row(logits[j], a - BAND, 1.0)).flatten().tolist())
            hi = set(torch.nonzero(top_h_keep_row(logits[j], a + BAND, 1.0)).flatten().tolist())
            checked += 1
            where = f"alpha {a}, {p!r}, position {j}"
            if token not in hi:
                problems.append(f"{where}: sampled {token} outside the reference kept set ({len(hi)} tokens)")
            if len(finite) < TOP:  # the whole kept set is visible
                fitted += 1
                if not lo <= finite <= hi:
                    problems.append(f"{where}: vLLM kept {sorted(finite)}, reference {sorted(lo)}..{sorted(hi)}")
            elif len(hi) < TOP:
                problems.append(f"{where}: vLLM kept >= {TOP} tokens, reference at most {len(hi)}")
    assert not problems, "\n".join(problems[:20])
    assert checked == len(jobs) * N_TOKENS and fitted >= checked // 2, (checked, fitted)
