"""Gateway reliability against the real vLLM CPU engine (default model), bounded in time:

  python -m bench.reliability [--soak-seconds 600] [--overload-seconds 60] [--out bench-results/reliability.json]

1. Aborts: 200 streams closed by the client after their first token and 200 closed before it (while queued
   or in prefill) → seconds until the engine's vllm:num_requests_running and _waiting are back to 0
   (target ≤ 2 s), and the TTFT of a fresh request before vs after.
2. Overload: 2× the gateway's capacity (max_concurrency + max_queue) in closed-loop clients for
   --overload-seconds → status counts (target: only 200 and 429, no 5xx).
3. Soak: mixed traffic (streams, non-streaming, clients leaving mid-stream, bad bodies) for --soak-seconds
   → the gateway's RSS and open fds, first sample after a warm-up vs the last (target: RSS growth < 5%,
   no fd growth).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.engine import MODEL, default_engine
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY, QUEUE = 8, 8  # the gateway's limits here: capacity 16 requests


def chat(max_tokens: int, stream: bool = True, text: str = "Write a long story about a lighthouse.") -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": stream, "temperature": 0.0}


def engine_busy(engine: str) -> float:
    busy = 0.0
    for fam in text_string_to_metric_families(httpx.get(engine + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                busy += s.value
    return busy


def start_gateway(engine: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--engine", engine, "--port", str(port),
           "--log-level", "warning", "--max-concurrency", str(CONCURRENCY), "--max-queue", str(QUEUE),
           "--queue-timeout", "5", "--health-interval", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway not ready")


async def ttft(c: httpx.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    async with c.stream("POST", url + "/v1/chat/completions", json=chat(8)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                return time.perf_counter() - t0
    raise RuntimeError("no token")


async def median_ttft(c: httpx.AsyncClient, url: str, n: int = 5) -> float:
    return statistics.median([await ttft(c, url) for _ in range(n)])


async def aborts(url: str, engine: str, n: int) -> dict:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        before = await median_ttft(c, url)
        statuses: collections.Counter = collections.Counter()

        async def after_first_token():
            async with c.stream("POST", url + "/v1/chat/completions", json=chat(256)) as r:
                statuses[r.status_code] += 1
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        return  # leaving the block closes the connection

        async def before_first_token():
            task = asyncio.ensure_future(c.post(url + "/v1/chat/completions", json=chat(256)))
            await asyncio.sleep(random.uniform(0.0, 0.05))  # sent, not answered: queued or in prefill
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, httpx.HTTPError):
                statuses["closed_before"] += 1

        sem = asyncio.Semaphore(16)

        async def bounded(f):
            async with sem:
                await f()
        jobs = [after_first_token] * n + [before_first_token] * n
        random.Random(0).shuffle(jobs)
        await asyncio.gather(*(bounded(f) for f in jobs))
        closed_at = time.perf_counter()
        while engine_busy(engine) > 0:
            if time.perf_counter() - closed_at > 60:
                break
            await asyncio.sleep(0.05)
        drained_s = time.perf_counter() - closed_at
        after = await median_ttft(c, url)
    return {"streams_closed_after_first_token": n, "streams_closed_before_first_token": n,
            "statuses": dict(statuses), "engine_idle_after_s": round(drained_s, 3),
            "ttft_before_ms": round(before * 1000, 1), "ttft_after_ms": round(after * 1000, 1)}


async def overload(url: str, seconds: float) -> dict:
    clients = 2 * (CONCURRENCY + QUEUE)
    statuses: collections.Counter = collections.Counter()
    stop = time.monotonic() + seconds

    async def client(c: httpx.AsyncClient):
        while time.monotonic() < stop:
            try:
                async with c.stream("POST", url + "/v1/chat/completions", json=chat(32)) as r:
                    async for _ in r.aiter_bytes():
                        pass
                    statuses[r.status_code] += 1
                    if r.status_code == 429:
                        await asyncio.sleep(0.2)  # a polite client backs off a little
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return {"clients": clients, "capacity": CONCURRENCY + QUEUE, "seconds": seconds,
            "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500)}


async def soak(url: str, gw: psutil.Process, seconds: float, warmup: float) -> dict:
    stop = time.monotonic() + seconds
    statuses: collections.Counter = collections.Counter()
    samples = []

    async def client(c: httpx.AsyncClient, i: int):
        rnd = random.Random(i)
        while time.monotonic() < stop:
            kind = rnd.choice(["stream", "stream", "json", "leave", "bad"])
            try:
                if kind == "bad":
                    r = await c.post(url + "/v1/chat/completions", content=b'{"model": "x", "messages": [{"role": 1}]}')
                    statuses[r.status_code] += 1
                elif kind == "json":
                    r = await c.post(url + "/v1/chat/completions", json=chat(16, stream=False))
                    statuses[r.status_code] += 1
                else:
                    async with c.stream("POST", url + "/v1/chat/completions", json=chat(24)) as r:
                        statuses[r.status_code] += 1
                        n = 0
                        async for line in r.aiter_lines():
                            n += line.startswith("data: {")
                            if kind == "leave" and n == 3:
                                break
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1

    async def sampler():
        t0 = time.monotonic()
        while time.monotonic() < stop:
            samples.append((round(time.monotonic() - t0, 1), gw.memory_info().rss, gw.num_fds()))
            await asyncio.sleep(5)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as c:
        await asyncio.gather(sampler(), *(client(c, i) for i in range(CONCURRENCY)))
    # fds: measured once the clients are gone, against the first sample after the warm-up
    await asyncio.sleep(3)
    end = (round(seconds, 1), gw.memory_info().rss, gw.num_fds())
    first = next(s for s in samples if s[0] >= warmup)
    rss_growth = (samples[-1][1] - first[1]) / first[1] * 100
    return {"seconds": seconds, "warmup_s": warmup, "statuses": {str(k): v for k, v in statuses.items()},
            "rss_first_mib": round(first[1] / 2**20, 1), "rss_last_mib": round(samples[-1][1] / 2**20, 1),
            "rss_growth_pct": round(rss_growth, 2), "fds_first": first[2], "fds_last_under_load": samples[-1][2],
            "fds_after_idle": end[2], "samples": samples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aborts", type=int, default=200, help="streams closed after / before their first token, each")
    ap.add_argument("--overload-seconds", type=float, default=60)
    ap.add_argument("--soak-seconds", type=float, default=600)
    ap.add_argument("--soak-warmup", type=float, default=30)
    ap.add_argument("--out", default="bench-results/reliability.json")
    a = ap.parse_args(argv)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python -m bench.reliability"] +
                                                                           (argv or sys.argv[1:]))}
    with default_engine() as engine:
        proc, url = start_gateway(engine)
        try:
            gw = psutil.Process(proc.pid)
            out["aborts"] = asyncio.run(aborts(url, engine, a.aborts))
            print(json.dumps(out["aborts"]), flush=True)
            out["overload"] = asyncio.run(overload(url, a.overload_seconds))
            print(json.dumps(out["overload"]), flush=True)
            out["soak"] = asyncio.run(soak(url, gw, a.soak_seconds, a.soak_warmup))
            print(json.dumps({k: v for k, v in out["soak"].items() if k != "samples"}), flush=True)
        finally:
            proc.terminate()
            out["gateway_exit_code"] = proc.wait(60)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    ok = (out["aborts"]["engine_idle_after_s"] <= 2 and out["overload"]["5xx"] == 0
          and out["soak"]["rss_growth_pct"] < 5 and out["soak"]["fds_after_idle"] <= out["soak"]["fds_first"])
    print("PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
