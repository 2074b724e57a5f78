"""How good can a fixed-rate retention score get? Free per-token rates fitted to one sequence.

    python -m bench.retention_free_rates --model ~/.cache/leanserve/models/SmolLM2-135M-Instruct

The served rule keeps the top M of log beta_i * (t - i), one rate per token, layer and KV head, fixed when the
token is written. The gates predict that rate from the token's hidden state. This replaces the gates by a free
rate for every (layer, head, token) of ONE sequence, starts from the shipped gates' rates, and fits them to that
very sequence with the evict objective (kernels/retention/evict.py). What it reaches is what any gate could
reach on that sequence under this rule and optimiser (it reads the sequence it is scored on, so it is a bound,
not a policy). It prints the hard-eviction KL of the start, of the best fit, and of H2O on the same sequence
(kernels/retention/evaluate.py's protocol).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


class FreeRates(torch.nn.Module):
    """Stands in for a GateSet: layer i returns its own free log beta [1, T, H], whatever the input."""

    def __init__(self, log_betas: list[torch.Tensor]):
        super().__init__()
        # log beta = logsigmoid(z); z = logit(beta) recovers the start exactly
        self.z = torch.nn.ParameterList(
            torch.nn.Parameter((lb - torch.log(-torch.expm1(lb.double().clamp_max(-1e-12)))).float())
            for lb in log_betas)

    def __getitem__(self, i):
        return lambda x: F.logsigmoid(self.z[i]).expand(x.shape[0], -1, -1)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels.retention import evict
    from kernels.retention.cli import _text_arg, eval_texts, shipped_gates_for
    from kernels.retention.evaluate import evaluate
    from kernels.retention.gate import GateSet
    from kernels.retention.llama import Parts, forward_full

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--gates", default=None, help="start (default: the shipped gates)")
    ap.add_argument("--text", default="data/reasoning_traces/sample.jsonl")
    ap.add_argument("--seq", type=int, default=0, help="which sequence of the text [0]")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=128)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--temperature", type=float, default=0.03)
    ap.add_argument("--every", type=int, default=10, help="measure the hard KL every N steps [10]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(a.model)
    seqs = eval_texts(tok, [_text_arg(a.text)], a.seq_len, a.seq + 1)
    name, ids = next(iter(seqs.items()))
    ids = ids[a.seq][None]
    parts = Parts(model)
    gates = GateSet.load(a.gates or shipped_gates_for(a.model))

    rows = evaluate(parts, gates, {name: [ids[0]]}, [a.budget], a.buffer, ["retention", "h2o"], progress=False,
                    sinks=a.sinks)
    by = {r.method: r.kl for r in rows if r.budget == a.budget}
    with torch.no_grad():
        _, lbs = forward_full(parts, ids, gates, want_logits=False)
    free = FreeRates([lb[0].transpose(0, 1) for lb in lbs])                  # [T, H] per layer

    def hard():
        with torch.no_grad():
            return evict.losses(parts, free, ids, a.budget, a.buffer, a.sinks, 1e-6)["kl"].item()

    start = hard()
    opt = torch.optim.Adam(free.parameters(), lr=a.lr)
    best, curve, t0 = start, [(0, start)], time.time()
    for step in range(1, a.steps + 1):
        loss = evict.losses(parts, free, ids, a.budget, a.buffer, a.sinks, a.temperature)["kl"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.every == 0 or step == a.steps:
            kl = hard()
            best = min(best, kl)
            curve.append((step, kl))
            print(f"step {step}: relaxed {loss.item():.4f}, hard {kl:.4f} ({time.time() - t0:.0f} s)", flush=True)
    # evict's KL averages over the queries after the first compaction; evaluate's over every predicted token
    # (0 before the first compaction): put both on evaluate's scale
    scale = (a.seq_len - a.budget - a.buffer) / (a.seq_len - 1)
    out = {"text": name, "seq": a.seq, "seq_len": a.seq_len, "budget": a.budget, "steps": a.steps, "lr": a.lr,
           "temperature": a.temperature, "h2o_kl": by["h2o"], "gates_kl": by["retention"],
           "gates_kl_evict_scale": start * scale, "free_best_kl": best * scale,
           "curve": [(s, k * scale) for s, k in curve], "seconds": round(time.time() - t0, 1)}
    print(f"{name} seq {a.seq} ({a.seq_len} tokens), M = {a.budget}: H2O {by['h2o']:.4f}, gates "
          f"{by['retention']:.4f} (evict scale {start * scale:.4f}), free rates fitted to it {best * scale:.4f} "
          f"= {best * scale / by['h2o']:.2f}x H2O")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
