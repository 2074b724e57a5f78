"""Gateway overhead, measured against the strongest baseline in the same run: the engine spoken to directly.

  python -m bench.gateway [--skip-real] [--out bench-results/gateway.json]

Part 1 (real): one vLLM CPU engine with the default model; streaming chat at concurrency 1 and 16,
  direct vs through the gateway, alternating rounds; output tokens/s and TTFT.
Part 2 (micro): the fake upstream (tests/support) so the gateway is the only cost: relayed tokens/s
  (wall, and per CPU-second of the gateway process pinned to one core), and added TTFT p50/p99.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from bench.engine import MODEL, default_engine
from tests.support.servers import free_port

CONTENT = re.compile(rb'"content": ?"[^"]')  # a non-empty content delta = one token event
ROOT = Path(__file__).resolve().parent.parent


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def wait_http(url: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def start_gateway(engine_url: str, cpu: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--engine", engine_url, "--port", str(port),
           "--log-level", "warning", "--max-concurrency", "1024", "--health-interval", "5"]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu] + cmd
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/ready")
    return proc, url


async def one_stream(c: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """(TTFT seconds, content events) for one streamed chat request."""
    t0 = time.perf_counter()
    ttft, n = None, 0
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for chunk in r.aiter_bytes():
            k = len(CONTENT.findall(chunk))
            if k and ttft is None:
                ttft = time.perf_counter() - t0
            n += k
    return ttft or float("nan"), n


async def load(url: str, body: dict, concurrency: int, requests: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        async def go():
            async with sem:
                return await one_stream(c, url, body)
        t0 = time.perf_counter()
        res = await asyncio.gather(*[go() for _ in range(requests)])
        wall = time.perf_counter() - t0
    ttfts = [r[0] for r in res]
    toks = sum(r[1] for r in res)
    return {"tokens": toks, "wall_s": wall, "tok_s": toks / wall, "ttft_p50_ms": 1e3 * pct(ttfts, 50),
            "ttft_p99_ms": 1e3 * pct(ttfts, 99)}


def real_part(rounds: int, max_tokens: int) -> list[dict]:
    rows = []
    with default_engine() as engine_url:
        gw, gw_url = start_gateway(engine_url)
        try:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "stream": True}
            asyncio.run(load(engine_url, body, 4, 4))  # warm-up
            for conc, n in ((1, 4), (16, 32)):
                acc = {"direct": [], "gateway": []}
                for i in range(rounds):  # alternate to cancel drift
                    order = [("direct", engine_url), ("gateway", gw_url)]
                    for name, url in (order if i % 2 == 0 else order[::-1]):
                        acc[name].append(asyncio.run(load(url, body, conc, n)))
                d = {k: _merge(v) for k, v in acc.items()}
                rows.append({"part": "real vLLM", "concurrency": conc, "direct": d["direct"], "gateway": d["gateway"],
                             "throughput_ratio": d["gateway"]["tok_s"] / d["direct"]["tok_s"],
                             "added_ttft_p50_ms": d["gateway"]["ttft_p50_ms"] - d["direct"]["ttft_p50_ms"]})
        finally:
            gw.terminate()
            gw.wait()
    return rows


def _merge(runs: list[dict]) -> dict:
    toks = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    return {"tokens": toks, "wall_s": wall, "tok_s": toks / wall,
            "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
            "ttft_p99_ms": max(r["ttft_p99_ms"] for r in runs)}


def micro_part(samples: int) -> dict:
    fport = free_port()
    fake = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-c",
         "import uvicorn; from tests.support.fake_upstream import FakeUpstream; "
         f"uvicorn.run(FakeUpstream(), host='127.0.0.1', port={fport}, log_level='warning')"], cwd=ROOT)
    fake_url = f"http://127.0.0.1:{fport}"
    wait_http(fake_url + "/health")
    gw, gw_url = start_gateway(fake_url, cpu="0")
    out = {}
    try:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True}
        # Added latency: alternate direct and gateway requests, one at a time.
        asyncio.run(load(gw_url, {**body, "max_tokens": 4}, 1, 20))
        lat = {"direct": [], "gateway": []}

        async def paired():
            async with httpx.AsyncClient(timeout=60) as c:
                for _ in range(samples):
                    for name, url in (("direct", fake_url), ("gateway", gw_url)):
                        lat[name].append((await one_stream(c, url, {**body, "max_tokens": 2}))[0])
        asyncio.run(paired())
        added = [g - d for g, d in zip(lat["gateway"], lat["direct"])]
        out["added_ttft_p50_ms"] = 1e3 * pct(added, 50)
        out["added_ttft_p99_ms"] = 1e3 * pct(added, 99)
        out["direct_ttft_p50_ms"] = 1e3 * pct(lat["direct"], 50)
        out["gateway_ttft_p50_ms"] = 1e3 * pct(lat["gateway"], 50)
        # Relay throughput: the gateway pinned to core 0; its CPU time tells tokens per core-second.
        p = psutil.Process(gw.pid)
        c0 = p.cpu_times()
        r = asyncio.run(load(gw_url, {**body, "max_tokens": 2000}, 16, 32))
        c1 = p.cpu_times()
        cpu_s = (c1.user - c0.user) + (c1.system - c0.system)
        out.update({"relayed_tokens": r["tokens"], "relay_wall_tok_s": r["tok_s"],
                    "gateway_cpu_s": cpu_s, "relay_tok_per_cpu_s": r["tokens"] / cpu_s,
                    "gateway_cpu_util": cpu_s / r["wall_s"]})
        direct = asyncio.run(load(fake_url, {**body, "max_tokens": 2000}, 16, 32))
        out["fake_direct_tok_s"] = direct["tok_s"]
    finally:
        gw.terminate()
        fake.terminate()
        gw.wait()
        fake.wait()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-real", action="store_true", help="only the fake-upstream microbenchmark")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per concurrency (real part)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--samples", type=int, default=300, help="paired requests for added latency")
    ap.add_argument("--out", default="bench-results/gateway.json")
    a = ap.parse_args(argv)
    result = {"cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if not a.skip_real:
        result["real"] = real_part(a.rounds, a.max_tokens)
    result["micro"] = micro_part(a.samples)
    print("\n| part | concurrency | direct tok/s | gateway tok/s | ratio | TTFT p50 direct / gateway (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in result.get("real", []):
        print(f"| real vLLM | {r['concurrency']} | {r['direct']['tok_s']:.1f} | {r['gateway']['tok_s']:.1f} | "
              f"{r['throughput_ratio']:.3f} | {r['direct']['ttft_p50_ms']:.1f} / {r['gateway']['ttft_p50_ms']:.1f} |")
    m = result["micro"]
    print(f"\nfake upstream: added TTFT p50 {m['added_ttft_p50_ms']:.2f} ms, p99 {m['added_ttft_p99_ms']:.2f} ms "
          f"(direct p50 {m['direct_ttft_p50_ms']:.2f} ms)")
    print(f"relay: {m['relay_wall_tok_s']:.0f} tok/s wall at gateway CPU utilisation {m['gateway_cpu_util']:.2f}; "
          f"{m['relay_tok_per_cpu_s']:.0f} tok per gateway CPU-second (one core); fake direct {m['fake_direct_tok_s']:.0f} tok/s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
