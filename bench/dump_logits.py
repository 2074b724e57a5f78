"""Real next-token logits of the default model, for kernel comparisons on real distributions.

  python -m bench.dump_logits --out /tmp/smollm2_logits.pt [--prompts 24] [--tokens 32]

For the first N GSM8K questions (chat template), samples a continuation at T = 1 with HF transformers
and saves the logits [N * tokens, V] (float32) of every generated position.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kernels.model_prep import default_model_dir

DATA = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "test500.jsonl"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--data", default=str(DATA))
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    torch.manual_seed(0)
    rows = []
    for line in list(open(a.data))[: a.prompts]:
        q = json.loads(line)["question"]
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=a.tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        rows.extend(l[0] for l in out.logits)
    logits = torch.stack(rows).float()
    torch.save(logits, a.out)
    print(f"saved logits {tuple(logits.shape)} to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
