"""Quality proxy for Top-H against min-p and top-p on the default model (a table, no pass/fail).

  python -m bench.top_h_quality [--prompts 100] [--max-tokens 64] [--out bench-results/top_h_quality.json]

For GSM8K questions (data/gsm8k/test500.jsonl, first N) at T = 1.0, 1.5, 2.0, each sampler
generates one seeded continuation per question on a real vLLM engine. Per continuation:
* mean log-likelihood per token under the model at T = 1 (vLLM returns raw logprobs of the sampled
  tokens: before temperature and truncation);
* distinct-2: distinct token bigrams / bigrams;
* repetition rate: share of token 4-grams that already occurred earlier in the same continuation.
Means over questions are reported.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from bench.engine import MODEL, default_engine

DATA = Path(__file__).resolve().parent.parent / "data" / "gsm8k" / "test500.jsonl"
SAMPLERS = {"top-h 0.4": {"top_h": 0.4}, "min-p 0.1": {"min_p": 0.1}, "top-p 0.9": {"top_p": 0.9},
            "none (plain sampling)": {}}  # the untruncated distribution, for scale
TEMPS = (1.0, 1.5, 2.0)


def distinct2(toks: list[str]) -> float:
    bi = list(zip(toks, toks[1:]))
    return len(set(bi)) / len(bi) if bi else 1.0


def repetition(toks: list[str], n: int = 4) -> float:
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams) if grams else 0.0


async def sample(c: httpx.AsyncClient, url: str, question: str, temp: float, knobs: dict, seed: int,
                 max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": temp,
            "seed": seed, "max_tokens": max_tokens, "logprobs": True, **knobs}
    if "top_h" in knobs:  # straight to the engine: the gateway would move it here itself
        body["vllm_xargs"] = {"top_h": body.pop("top_h")}
    r = await c.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    content = r.json()["choices"][0]["logprobs"]["content"] or []
    toks = [t["token"] for t in content]
    lps = [t["logprob"] for t in content if t["logprob"] is not None and t["logprob"] > float("-inf")]
    return {"ll": statistics.fmean(lps) if lps else float("nan"), "d2": distinct2(toks), "rep": repetition(toks),
            "n": len(toks)}


async def run(url: str, questions: list[str], max_tokens: int, concurrency: int) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    rows = []
    async with httpx.AsyncClient(timeout=600) as c:
        for temp in TEMPS:
            for name, knobs in SAMPLERS.items():
                async def one(i, q):
                    async with sem:
                        return await sample(c, url, q, temp, knobs, 1000 + i, max_tokens)
                t0 = time.perf_counter()
                res = await asyncio.gather(*[one(i, q) for i, q in enumerate(questions)])
                rows.append({"temperature": temp, "sampler": name,
                             "loglik_per_token": statistics.fmean(r["ll"] for r in res),
                             "distinct2": statistics.fmean(r["d2"] for r in res),
                             "repetition": statistics.fmean(r["rep"] for r in res),
                             "tokens": sum(r["n"] for r in res), "seconds": time.perf_counter() - t0})
                print(f"T={temp} {name}: done in {rows[-1]['seconds']:.0f}s", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--engine", default=None, help="use a running engine (base URL) instead of starting one")
    ap.add_argument("--out", default="bench-results/top_h_quality.json")
    a = ap.parse_args(argv)
    questions = [json.loads(line)["question"] for line in open(a.data)][: a.prompts]
    if a.engine:
        rows = asyncio.run(run(a.engine, questions, a.max_tokens, a.concurrency))
    else:
        with default_engine() as url:
            rows = asyncio.run(run(url, questions, a.max_tokens, a.concurrency))
    print(f"\n{len(questions)} GSM8K questions, {a.max_tokens} tokens max, one seeded sample each\n")
    print("| T | sampler | log-lik/token (T=1) | distinct-2 | repetition (4-gram) |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['temperature']} | {r['sampler']} | {r['loglik_per_token']:.3f} | {r['distinct2']:.3f} | "
              f"{r['repetition']:.3f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
