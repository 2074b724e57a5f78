"""The design figure behind the relay's upstream client: CPU cost of reading engine SSE streams with aiohttp
(what server/relay.py uses) vs httpx, both splitting events with server.sse.EventSplitter as the relay does.

  python -m bench.upstream_client [--rounds 3] [--streams 32] [--tokens 2000] [--out bench-results/upstream_client.json]

The fake upstream (tests/support/fake_upstream.py) runs in a child process pinned to core 1, the reader in
this process pinned to core 0; each round reads `streams` streams of `tokens` token events, 16 at a time,
once per client, alternating the order (a new connection per stream for both: no keep-alive races). Reported: events per CPU-second of the reading process (its own
process time), and httpx / aiohttp.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx

from bench.gateway import wait_http
from server.sse import EventSplitter
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 16


async def read_aiohttp(url: str, body: dict, streams: int) -> int:
    sem = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        async def one() -> int:
            async with sem, s.post(url, json=body) as r:
                sp, n = EventSplitter(), 0
                async for chunk in r.content.iter_any():
                    n += len(sp.feed(chunk))
                return n
        return sum(await asyncio.gather(*[one() for _ in range(streams)]))


async def read_httpx(url: str, body: dict, streams: int) -> int:
    sem = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        async def one() -> int:
            async with sem, c.stream("POST", url, json=body) as r:
                sp, n = EventSplitter(), 0
                async for chunk in r.aiter_raw():
                    n += len(sp.feed(chunk))
                return n
        return sum(await asyncio.gather(*[one() for _ in range(streams)]))


CLIENTS = {"aiohttp": read_aiohttp, "httpx": read_httpx}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--out", default="bench-results/upstream_client.json")
    a = ap.parse_args(argv)
    port = free_port()
    fake = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-c",
         "import uvicorn; from tests.support.fake_upstream import FakeUpstream; "
         f"uvicorn.run(FakeUpstream(), host='127.0.0.1', port={port}, log_level='warning')"], cwd=ROOT)
    os.sched_setaffinity(0, {0})
    url = f"http://127.0.0.1:{port}"
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "max_tokens": a.tokens}
    acc = {name: [0, 0.0] for name in CLIENTS}  # events, CPU seconds
    try:
        wait_http(url + "/health")
        asyncio.run(read_aiohttp(url + "/v1/chat/completions", {**body, "max_tokens": 10}, 2))  # warm-up
        for i in range(a.rounds):
            for name in (list(CLIENTS) if i % 2 == 0 else list(CLIENTS)[::-1]):
                c0 = time.process_time()
                events = asyncio.run(CLIENTS[name](url + "/v1/chat/completions", body, a.streams))
                acc[name][0] += events
                acc[name][1] += time.process_time() - c0
    finally:
        fake.terminate()
        fake.wait()
    per_cpu = {name: ev / cpu for name, (ev, cpu) in acc.items()}
    print(f"\nreading {a.rounds} x {a.streams} streams of {a.tokens} events, {CONCURRENCY} at a time, one core:")
    print("| client | events | CPU s | events per CPU-second |\n|---|---:|---:|---:|")
    for name, (ev, cpu) in acc.items():
        print(f"| {name} | {ev} | {cpu:.2f} | {per_cpu[name]:,.0f} |")
    print(f"\nhttpx / aiohttp CPU per event: {per_cpu['aiohttp'] / per_cpu['httpx']:.2f}")
    result = {"date": time.strftime("%Y-%m-%d"), "rounds": a.rounds, "streams": a.streams, "tokens": a.tokens,
              "events_per_cpu_s": per_cpu, "totals": acc}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
