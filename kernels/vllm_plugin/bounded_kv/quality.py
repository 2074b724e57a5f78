"""Quality of the bounded cache measured through the real vLLM engine, against the reference eviction.

The texts and sequences of `leanserve eval kv` (kernels/retention/cli.eval_texts) are sent to the bounded
engine as prompts with prompt logprobs: vLLM teacher-forces them, prefilled in chunks, split where each
ring fills exactly as the reference's pieces are. For every budget M the same sequences then go through
kernels/retention/llama.BoundedLM (HF, fp32, the same gates) and the full model, and this prints, per
text and M: perplexity (engine vs reference), the largest and mean gap between their log-probabilities
of the actual next tokens, and KL(full || bounded).

vLLM returns the top-k log-probabilities of a position (k <= 20), not the whole distribution, so the KL
here is that of the coarse distributions over {the engine's top-k tokens, everything else}: a lower
bound on the full KL, computed the same way for the engine and for the reference (the reference's full
KL is printed beside it). One engine per budget, each in its own process, one at a time.

    python -m kernels.vllm_plugin.bounded_kv.quality --max-seqs 2 --json bench-results/bounded_kv_quality.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPK = 20  # vLLM's default --max-logprobs


def engine_worker(cfg: dict) -> None:
    """In the child: one bounded engine; saves per sequence (actual-token logprobs [T-1], top-k ids and
    logprobs [T-1, k]) to cfg["out"]."""
    import torch
    from vllm import LLM, SamplingParams

    from .config import engine_args

    seqs = torch.load(cfg["seqs"])
    llm = LLM(model=cfg["model"], dtype="float32", enforce_eager=True, enable_prefix_caching=False,
              max_model_len=cfg["seq_len"] + 8, max_num_batched_tokens=cfg["batch"], max_logprobs=TOPK,
              hf_overrides=json.loads(engine_args(cfg["model"], cfg["budget"], cfg["buffer"], cfg["gates"])[1]))
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=TOPK)
    outs = llm.generate([{"prompt_token_ids": s.tolist()} for s in seqs], sp, use_tqdm=False)
    res = []
    for ids, o in zip(seqs, outs):
        plp = o.prompt_logprobs
        actual, top_ids, top_lp = [], [], []
        for t in range(1, len(ids)):
            d = plp[t]
            actual.append(d[int(ids[t])].logprob)
            best = sorted(d.items(), key=lambda kv: kv[1].rank)[:TOPK]
            top_ids.append([k for k, _ in best])
            top_lp.append([v.logprob for _, v in best])
        res.append((torch.tensor(actual), torch.tensor(top_ids), torch.tensor(top_lp)))
    torch.save(res, cfg["out"])


def run_engine(cfg: dict, timeout: float) -> list:
    import torch

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    p = subprocess.run([sys.executable, "-m", "kernels.vllm_plugin.bounded_kv.quality", "--worker",
                        json.dumps(cfg)], capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"engine at M={cfg['budget']} failed:\n{p.stderr[-3000:]}")
    return torch.load(cfg["out"])


def coarse_kl(full_logp, top_ids, q_top):
    """KL(p || q) of the distributions coarsened to {each of the k tokens, the rest}; rows are positions.
    full_logp [T, V]; top_ids [T, k]; q_top [T, k]: q's log-probabilities of those tokens."""
    import torch

    p_top = full_logp.gather(1, top_ids)
    p_rest = (1 - p_top.exp().sum(1)).clamp_min(1e-12)
    q_rest = (1 - q_top.exp().sum(1)).clamp_min(1e-12)
    kl = (p_top.exp() * (p_top - q_top)).sum(1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.sum().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="HF model directory (default: the prepared default model)")
    ap.add_argument("--gates", default=None, help="gate checkpoint (default: the ones shipped for the model)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--buffer", type=int, default=128)
    ap.add_argument("--text", action="append", default=None, metavar="PATH[@A:B]",
                    help="as for `leanserve eval kv` (default: its held-out texts)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--max-seqs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512, help="engine --max-num-batched-tokens (chunked prefill)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.worker:
        engine_worker(json.loads(a.worker))
        return 0

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels.model_prep import default_model_dir
    from kernels.retention.cli import _text_arg, eval_texts
    from kernels.retention.gate import GateSet
    from kernels.retention.llama import BoundedLM, Parts, forward_full
    from kernels.retention.reference import BoundedCache, RetentionPolicy

    from .config import shipped_gates

    model = str(a.model or default_model_dir())
    gates_dir = str(a.gates or shipped_gates(model))
    if a.threads:
        torch.set_num_threads(a.threads)
    texts = eval_texts(AutoTokenizer.from_pretrained(model), [_text_arg(t) for t in a.text] if a.text else None,
                       a.seq_len, a.max_seqs)
    gates = GateSet.load(gates_dir)
    tmp = Path(tempfile.mkdtemp(prefix="bounded-kv-quality-"))
    names = list(texts)
    flat = [s for n in names for s in texts[n]]
    torch.save(flat, tmp / "seqs.pt")
    engine = {}
    for m in a.budgets:  # engines first (one at a time), then the reference in this process
        t0 = time.perf_counter()
        engine[m] = run_engine({"model": model, "gates": gates_dir, "budget": m, "buffer": a.buffer,
                                "seq_len": a.seq_len, "batch": a.batch, "seqs": str(tmp / "seqs.pt"),
                                "out": str(tmp / f"engine-{m}.pt")}, a.timeout)
        print(f"... engine M={m}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    parts = Parts(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval())
    rows = []
    i0 = 0
    for name in names:
        seqs = texts[name]
        with torch.no_grad():
            full = [F.log_softmax(forward_full(parts, s.unsqueeze(0))[0][0, :-1].float(), -1) for s in seqs]
        n_tok = sum(len(s) - 1 for s in seqs)
        for m in a.budgets:
            acc = dict(nll_e=0.0, nll_r=0.0, kl_e=0.0, kl_r=0.0, kl_full=0.0, gap_max=0.0, gap_sum=0.0)
            for j, (s, fl) in enumerate(zip(seqs, full)):
                actual, top_ids, top_lp = engine[m][i0 + j]
                cache = BoundedCache(parts.num_layers, m, a.buffer, RetentionPolicy(sinks=gates.meta.sinks))
                ref = F.log_softmax(BoundedLM(parts, cache, gates).feed(s)[:-1], -1)
                ref_actual = ref.gather(1, s[1:, None])[:, 0]
                gap = (actual - ref_actual).abs()
                acc["gap_max"] = max(acc["gap_max"], gap.max().item())
                acc["gap_sum"] += gap.sum().item()
                acc["nll_e"] -= actual.sum().item()
                acc["nll_r"] -= ref_actual.sum().item()
                acc["kl_e"] += coarse_kl(fl, top_ids, top_lp)
                acc["kl_r"] += coarse_kl(fl, top_ids, ref.gather(1, top_ids))
                acc["kl_full"] += (fl.exp() * (fl - ref)).sum().item()
            rows.append({"text": name, "budget": m, "buffer": a.buffer, "tokens": n_tok,
                         "ppl_engine": float(torch.tensor(acc["nll_e"] / n_tok).exp()),
                         "ppl_reference": float(torch.tensor(acc["nll_r"] / n_tok).exp()),
                         "logprob_gap_max": acc["gap_max"], "logprob_gap_mean": acc["gap_sum"] / n_tok,
                         f"kl_top{TOPK}_engine": acc["kl_e"] / n_tok, f"kl_top{TOPK}_reference": acc["kl_r"] / n_tok,
                         "kl_full_reference": acc["kl_full"] / n_tok})
        i0 += len(seqs)
    print(f"{'text':<22} {'M':>4} {'ppl engine':>10} {'ppl ref':>9} {'|dlogp| max':>11} {'mean':>8} "
          f"{'KL@20 eng':>9} {'KL@20 ref':>9} {'KL ref':>7}")
    for r in rows:
        print(f"{r['text']:<22} {r['budget']:>4} {r['ppl_engine']:>10.4f} {r['ppl_reference']:>9.4f} "
              f"{r['logprob_gap_max']:>11.2e} {r['logprob_gap_mean']:>8.1e} {r[f'kl_top{TOPK}_engine']:>9.4f} "
              f"{r[f'kl_top{TOPK}_reference']:>9.4f} {r['kl_full_reference']:>7.4f}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "sinks": gates.meta.sinks,
                                            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
