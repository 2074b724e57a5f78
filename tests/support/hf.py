"""Reference generations with HF transformers (float32) for comparing engine outputs token for token."""
from __future__ import annotations

import contextlib


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


def hf_greedy(model_dir, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """Greedy continuation ids (no EOS stop) of each prompt (token ids), with a KV cache as vLLM decodes."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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
