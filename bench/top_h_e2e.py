"""End-to-end decode throughput on a real vLLM engine with and without Top-H, in one run.

  python -m bench.top_h_e2e [--rounds 3] [--concurrency 1 16] [--requests 8] [--out bench-results/top_h_e2e.json]

Same engine, same prompts and lengths (ignore_eos), T = 1; rounds alternate the order of the two
variants to cancel drift. Reports output tokens/s and the overhead of Top-H.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.engine import MODEL, default_engine
from bench.gateway import load


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--alpha", type=float, default=0.4)
    ap.add_argument("--requests", type=int, default=8,
                    help="requests per variant and round (at least 2 x concurrency)")
    ap.add_argument("--out", default="bench-results/top_h_e2e.json")
    a = ap.parse_args(argv)
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": a.max_tokens, "ignore_eos": True, "temperature": 1.0, "stream": True}
    variants = {"plain": base, "top_h": {**base, "vllm_xargs": {"top_h": a.alpha}}}
    rows = []
    with default_engine() as url:
        asyncio.run(load(url, variants["top_h"], 4, 4))  # warm-up both paths
        asyncio.run(load(url, base, 4, 4))
        for conc in a.concurrency:
            n = max(a.requests, 2 * conc)
            acc = {k: [0, 0.0] for k in variants}
            for i in range(a.rounds):
                names = list(variants) if i % 2 == 0 else list(variants)[::-1]
                for k in names:
                    r = asyncio.run(load(url, variants[k], conc, n))
                    acc[k][0] += r["tokens"]
                    acc[k][1] += r["wall_s"]
            tps = {k: v[0] / v[1] for k, v in acc.items()}
            rows.append({"concurrency": conc, "plain_tok_s": tps["plain"], "top_h_tok_s": tps["top_h"],
                         "ratio": tps["top_h"] / tps["plain"]})
    print(f"\n| concurrency | plain tok/s | top-h {a.alpha} tok/s | ratio | overhead |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['plain_tok_s']:.1f} | {r['top_h_tok_s']:.1f} | {r['ratio']:.3f} | "
              f"{100 * (1 - r['ratio']):.1f}% |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
