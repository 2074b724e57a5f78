"""Engine discovery by DNS (server/discovery.py) against real fake engines on loopback addresses.

Every engine listens on the same port on its own address (127.0.0.2, 127.0.0.3, ...), like the pods
behind a Kubernetes headless Service. `Zone` is the DNS the test edits: it answers the gateway's
resolver calls the way getaddrinfo does (addresses, or socket.gaierror), so everything after the
lookup runs the production path; one test resolves `localhost` through the real getaddrinfo.
"""
from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from server.discovery import engine_url, parse_target
from tests.support.fake_upstream import MODEL, FakeUpstream
from tests.support.probes import metric, wait_for
from tests.support.servers import ThreadedServer, free_port

NAME = "engines.leanserve.test"
ADDRS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Zone:
    """Name -> addresses, edited by the test while the gateway resolves from its own thread."""

    def __init__(self):
        self.records: dict[str, tuple[str, ...]] = {}
        self.failure: int | None = None  # a gaierror errno every lookup raises (EAI_AGAIN: DNS is down)
        self.lookups = 0

    def set(self, *addresses: str) -> None:
        self.records[NAME] = tuple(addresses)

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if self.failure is not None:
            raise socket.gaierror(self.failure, "Temporary failure in name resolution")
        if not self.records.get(host):  # what the system resolver says for a headless Service with no pods
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.records[host])


class GatedUpstream(FakeUpstream):
    """A fake engine whose streams hold before each token while `gate` is clear."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.gate = threading.Event()
        self.gate.set()

    async def _sleep(self, seconds, gone):
        while not self.gate.is_set() and not gone.is_set():
            await asyncio.sleep(0.005)
        return await super()._sleep(seconds, gone)


@pytest.fixture
def cluster():
    """Fake engines on ADDRS sharing one port, and gateways discovering them through a Zone."""
    port = free_port(ADDRS)
    started: list[ThreadedServer] = []
    engines = {}
    for addr in ADDRS:
        fake = GatedUpstream()
        srv = ThreadedServer(fake, port=port, host=addr).start()
        fake.url = srv.url
        engines[addr] = fake
        started.append(srv)
    zone = Zone()

    def gateway(engines_static=(), resolver=zone, target=f"{NAME}:{port}", **kw):
        kw.setdefault("health_interval", 0.1)
        app = create_app(Settings(engines=list(engines_static), engine_dns=[target], **kw), resolver=resolver)
        srv = ThreadedServer(app).start()
        started.append(srv)
        return srv

    yield engines, zone, gateway, port
    for e in engines.values():
        e.gate.set()
    for s in reversed(started):
        s.stop()


def ready(gw) -> dict:
    return httpx.get(gw.url + "/ready", timeout=10).json()


def pool_is(gw, healthy: set[str], draining: frozenset[str] = frozenset()) -> bool:
    """The gateway's pool holds exactly these healthy engines (and these draining ones)."""
    engines = ready(gw)["engines"]
    return ({e["url"] for e in engines if not e["draining"] and e["healthy"]} == healthy
            and {e["url"] for e in engines if e["draining"]} == set(draining)
            and all(e["healthy"] or e["draining"] for e in engines))


def urls(engines, *addrs) -> set[str]:
    return {engines[a].url for a in addrs}


def counts(engines) -> dict[str, int]:
    return {a: len(e.requests) for a, e in engines.items()}


def chat_stream(gw, client: httpx.Client | None = None, **extra) -> str:
    c = client or httpx
    r = c.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True, **extra}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.text.endswith("data: [DONE]\n\n") and r.text.count("tok") == CHAT["max_tokens"], r.text
    return r.text


def test_requests_follow_the_resolved_set_as_it_grows_and_shrinks(cluster):
    engines, zone, gateway, _ = cluster
    a, b, c = ADDRS
    zone.set(a)
    gw = gateway()
    assert pool_is(gw, urls(engines, a))  # resolved and probed before the first request
    for _ in range(3):
        chat_stream(gw)
    assert counts(engines) == {a: 3, b: 0, c: 0}

    zone.set(a, b, c)  # scale up: both newcomers are probed and admitted
    assert wait_for(lambda: pool_is(gw, urls(engines, a, b, c)))

    async def burst(n):  # concurrent and slow enough that least-in-flight uses every engine
        async with httpx.AsyncClient(timeout=30) as cl:
            rs = await asyncio.gather(*[cl.post(gw.url + "/v1/chat/completions",
                                                json={**CHAT, "fake_first_token_delay": 0.3}) for _ in range(n)])
        assert [r.status_code for r in rs] == [200] * n
    before = counts(engines)
    asyncio.run(burst(6))
    assert {k: v - before[k] for k, v in counts(engines).items()} == {a: 2, b: 2, c: 2}

    zone.set(c)  # scale down to one: a and b are drained (idle, so forgotten at once)
    assert wait_for(lambda: pool_is(gw, urls(engines, c)))
    before = counts(engines)
    for _ in range(4):
        chat_stream(gw)
    assert {k: v - before[k] for k, v in counts(engines).items()} == {a: 0, b: 0, c: 4}


def test_a_removed_engine_finishes_its_streams_gets_nothing_new_and_leaves_no_metric_series(cluster):
    engines, zone, gateway, _ = cluster
    a, b, _ = ADDRS
    zone.set(a)
    gw = gateway()
    ea, eb = engines[a], engines[b]
    ea.gate.clear()  # a's stream will hold until the test lets it go
    out: dict[str, str] = {}
    streamer = threading.Thread(target=lambda: out.setdefault("text", chat_stream(gw)))
    streamer.start()
    assert wait_for(lambda: ea.active == 1)

    zone.set(b)  # a leaves DNS mid-stream
    assert wait_for(lambda: pool_is(gw, urls(engines, b), draining=frozenset(urls(engines, a))))
    for _ in range(3):
        chat_stream(gw)
    assert len(ea.requests) == 1 and len(eb.requests) == 3 and ea.active == 1
    assert metric(gw.url, "leanserve_engine_requests_in_flight", replica=ea.url) == 1

    ea.gate.set()
    streamer.join(30)
    assert out["text"].count("tok") == CHAT["max_tokens"]  # the whole stream, then [DONE] (chat_stream checks)
    assert ea.completed == 1 and ea.disconnects == 0
    assert wait_for(lambda: pool_is(gw, urls(engines, b)))  # drained: forgotten
    text = httpx.get(gw.url + "/metrics").text
    assert f'replica="{ea.url}"' not in text and f'replica="{eb.url}"' in text


def test_an_engine_that_comes_back_while_draining_is_the_same_replica_again(cluster):
    engines, zone, gateway, _ = cluster
    a, b, _ = ADDRS
    zone.set(a, b)
    gw = gateway()
    ea = engines[a]
    ea.gate.clear()
    streamer = threading.Thread(target=lambda: chat_stream(gw))
    streamer.start()
    assert wait_for(lambda: ea.active == 1)
    zone.set(b)
    assert wait_for(lambda: pool_is(gw, urls(engines, b), draining=frozenset(urls(engines, a))))
    zone.set(a, b)  # flaps back before its stream ended
    assert wait_for(lambda: any(e["url"] == ea.url and not e["draining"] for e in ready(gw)["engines"]))
    assert [e["in_flight"] for e in ready(gw)["engines"] if e["url"] == ea.url] == [1]
    ea.gate.set()
    streamer.join(30)
    assert wait_for(lambda: pool_is(gw, urls(engines, a, b)))
    assert metric(gw.url, "leanserve_engine_requests_in_flight", replica=ea.url) == 0
    assert metric(gw.url, "leanserve_engine_healthy", replica=ea.url) == 1


def test_no_request_is_lost_while_the_set_flaps(cluster):
    engines, zone, gateway, _ = cluster
    a, b, c = ADDRS
    zone.set(a, b)
    gw = gateway()
    done = threading.Event()
    results: list[tuple[int, str]] = []

    def traffic(n_max=400):
        with httpx.Client(timeout=30) as cl:
            while not done.is_set() and len(results) < n_max:
                r = cl.post(gw.url + "/v1/chat/completions",
                            json={**CHAT, "stream": True, "fake_token_delay": 0.005})
                results.append((r.status_code, r.text))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    for phase in [(c,), (a, c), (b,), (a, b, c), (a,), (b, c), (a, b)] * 2:
        zone.set(*phase)
        assert wait_for(lambda: pool_is(gw, urls(engines, *phase)), timeout=10), (phase, ready(gw))
        n = len(results)
        assert wait_for(lambda: len(results) >= n + 2, timeout=10)  # traffic ran against this set
    done.set()
    for w in workers:
        w.join(30)
    assert len(results) >= 28
    bad = [(s, t[-200:]) for s, t in results if s != 200 or not t.endswith("data: [DONE]\n\n")
           or t.count("tok") != CHAT["max_tokens"]]
    assert bad == []
    # Every request reached exactly one engine and finished there: none lost, none retried.
    assert sum(e.completed for e in engines.values()) == len(results)
    assert sum(len(e.requests) for e in engines.values()) == len(results)
    assert all(e.disconnects == 0 for e in engines.values())


def test_newcomers_are_admitted_only_once_healthy(cluster):
    engines, zone, gateway, port = cluster
    a, b, _ = ADDRS
    zone.set(a)
    gw = gateway()
    engines[b].healthy = False
    nobody = "127.0.0.9"  # resolves, but nothing listens there
    zone.set(a, b, nobody)
    assert wait_for(lambda: {e["url"] for e in ready(gw)["engines"]} == urls(engines, a, b) | {f"http://{nobody}:{port}"})
    assert pool_is(gw, urls(engines, a)) is False  # b and nobody are members, not routable
    for _ in range(3):
        chat_stream(gw)
    assert len(engines[b].requests) == 0
    engines[b].healthy = True
    assert wait_for(lambda: {e["url"] for e in ready(gw)["engines"] if e["healthy"]} == urls(engines, a, b))


def test_resolver_failure_keeps_the_engines_and_no_name_empties_the_pool(cluster):
    engines, zone, gateway, _ = cluster
    a, _, _ = ADDRS
    zone.set(a)
    gw = gateway()
    zone.failure = socket.EAI_AGAIN  # DNS server unreachable: not an answer, keep serving
    n = zone.lookups
    assert wait_for(lambda: zone.lookups >= n + 3)
    assert pool_is(gw, urls(engines, a))
    chat_stream(gw)
    zone.failure = None
    zone.set()  # the name has no address any more (every pod gone)
    assert wait_for(lambda: ready(gw)["engines"] == [])
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert httpx.get(gw.url + "/ready").status_code == 503
    zone.set(a)
    assert wait_for(lambda: pool_is(gw, urls(engines, a)))
    chat_stream(gw)


def test_static_engines_stay_when_the_name_resolves_to_nothing(cluster, make_upstream):
    engines, zone, gateway, _ = cluster
    a, _, _ = ADDRS
    static = make_upstream()
    zone.set(a)
    gw = gateway(engines_static=[static.url])
    assert pool_is(gw, {static.url} | urls(engines, a))
    zone.set()
    assert wait_for(lambda: pool_is(gw, {static.url}))
    chat_stream(gw)
    assert len(static.requests) == 1


def test_localhost_resolves_through_the_system_resolver(upstream):
    port = int(upstream.url.rsplit(":", 1)[1])
    app = create_app(Settings(engine_dns=[f"localhost:{port}"], health_interval=0.1))  # getaddrinfo
    with ThreadedServer(app) as gw:
        found = {e["url"]: e["healthy"] for e in ready(gw)["engines"]}
        assert found[f"http://127.0.0.1:{port}"] is True
        assert set(found) <= {f"http://127.0.0.1:{port}", f"http://[::1]:{port}"}  # ::1 too where hosts says so
        chat_stream(gw)
    assert len(upstream.requests) == 1


def test_targets_and_urls():
    assert parse_target("leanserve-engines:8000") == ("leanserve-engines", 8000)
    assert parse_target("[fd00::1]:80") == ("fd00::1", 80)
    assert engine_url("10.1.2.3", 8000) == "http://10.1.2.3:8000"
    assert engine_url("fd00::1", 8000) == "http://[fd00::1]:8000"
    for bad in ("leanserve-engines", "x:0", "x:70000", ":80", "x:port"):
        with pytest.raises(ValueError):
            parse_target(bad)
    s = Settings(engine_dns=["a:1,b:2", "c:3"])
    assert s.engine_dns == ["a:1", "b:2", "c:3"]


def test_engine_dns_env_and_flags(monkeypatch):
    from pydantic import ValidationError
    from server.cli import _settings_from, build_parser

    monkeypatch.setenv("LEANSERVE_ENGINE_DNS", "leanserve-engines:8000, other:9000")
    assert Settings().engine_dns == ["leanserve-engines:8000", "other:9000"]
    args = build_parser().parse_args(["serve", "--engine-dns", "x:1", "--engine-dns", "y:2,z:3"])
    assert _settings_from(args).engine_dns == ["x:1", "y:2", "z:3"]
    with pytest.raises(ValidationError, match="NAME:PORT"):
        Settings(engine_dns=["no-port"])


async def test_a_probe_that_outlives_its_replica_does_not_bring_its_series_back(upstream):
    """A health round that was already running when the engine was drained and forgotten."""
    import aiohttp

    from server.metrics import Metrics
    from server.replicas import ReplicaPool

    m = Metrics()
    async with aiohttp.ClientSession() as client:
        pool = ReplicaPool([], client, m, interval=0.1, discovered=True)
        r = pool.add(upstream.url)
        await pool.probe(r)
        assert r.healthy and m.registry.get_sample_value("leanserve_engine_healthy", {"replica": upstream.url}) == 1
        pool.acquire(r)
        pool.drain(upstream.url)
        assert pool.replicas == [] and pool.draining == [r]
        pool.release(r)  # the last in-flight request ends: forgotten
        assert pool.draining == [] and r.gone
        await pool.probe(r)
    assert upstream.url not in {s.labels.get("replica") for f in m.registry.collect() for s in f.samples}
