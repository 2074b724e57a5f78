"""Reference generations with HF transformers (float32) for comparing engine outputs token for token."""
from __future__ import annotations

import contextlib


# Greedy-equality prompts of the engine tests: plain text, code, a chat turn, a counting pattern.
GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three most important inventions of the twentieth century are",
    "Water boils at a temperature of",
    "In 1492, Christopher Columbus",
    "The quick brown fox",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which",
    "1, 2, 3, 4, 5,",
]


@contextlib.contextmanager
def one_thread():
    """Single-threaded torch: on a 2-core machine with another busy process, two OpenMP threads made
    small forward steps 2-3x slower (measured)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def hf_greedy(model, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """Greedy continuation ids (no EOS stop) of each prompt (token ids), with a KV cache as vLLM decodes.
    model: a loaded HF model, or a checkpoint dir (kernels.perplexity.load_model: float32, ARMOR too)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        from kernels.perplexity import load_model
        model = load_model(model)[1]
    out = []
    with torch.no_grad(), one_thread():
        for ids in prompts:
            inp, past, gen = torch.tensor([ids]), None, []
            for _ in range(n_tokens):
                o = model(inp, past_key_values=past, use_cache=True)
                past = o.past_key_values
                gen.append(int(o.logits[0, -1].argmax()))
                inp = torch.tensor([[gen[-1]]])
            out.append(gen)
    return out


def first_difference(got: list[int], want: list[int]) -> str | None:
    if got == want:
        return None
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first difference at token {i}: engine {got[i:i + 5]} HF {want[i:i + 5]}"


def engine_greedy_mismatches(engine_url: str, model: str, prompts: dict[str, list[int]],
                             want: list[list[int]]) -> list[str]:
    """Greedy completions of each prompt (label -> token ids) on a vLLM server, one request at a time (the
    batch shape stays that of a single request), against `want`: one line per prompt that differs."""
    import httpx

    out = []
    with httpx.Client(base_url=engine_url, timeout=600) as c:
        for (label, ids), w in zip(prompts.items(), want):
            r = c.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": len(w),
                                                "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            r.raise_for_status()
            diff = first_difference(r.json()["choices"][0]["token_ids"], w)
            if diff:
                out.append(f"{label!r}: {diff}")
    return out
