"""Engine replicas: background health probes, least-in-flight routing among healthy ones.

The set can change at runtime (server/discovery.py): `add` admits a new engine once a probe passes;
`drain` stops routing to one at once and forgets it when its last in-flight request ends, dropping its
per-replica metric series so labels stay bounded under pod churn."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiohttp

from .errors import APIError
from .metrics import Metrics
from .redact import redact_url

log = logging.getLogger("leanserve.replicas")


@dataclass(eq=False)
class Replica:
    url: str
    healthy: bool = False
    in_flight: int = 0
    models: list[dict] = field(default_factory=list)  # /v1/models "data" entries as the engine reports them
    draining: bool = False  # removed from the pool: serves its in-flight requests, gets no new ones
    gone: bool = False  # drained and forgotten: its metric series are removed and must not come back
    label: str = ""  # the URL without credentials: what /ready, metrics and logs show

    def __post_init__(self) -> None:
        self.label = redact_url(self.url)

    def serves(self, model: str) -> bool:
        return any(m.get("id") == model for m in self.models)


class ReplicaPool:
    def __init__(self, urls: list[str], client: aiohttp.ClientSession, metrics: Metrics, interval: float = 2.0,
                 discovered: bool = False):
        if not urls and not discovered:
            raise ValueError("at least one engine URL is needed")
        self.replicas = [Replica(u) for u in urls]  # the routable set, in admission order
        self.static_urls = frozenset(urls)  # configured ones: discovery never drains them
        self.draining: list[Replica] = []
        self._gauges = {r: metrics.engine_in_flight.labels(r.label) for r in self.replicas}
        self._client = client
        self._metrics = metrics
        self._interval = interval
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    # ---- health -------------------------------------------------------------------------------
    async def probe(self, replica: Replica) -> None:
        """Never raises (but for cancellation): any answer of the engine is a verdict, and the loop lives on."""
        timeout = aiohttp.ClientTimeout(total=self._interval * 2 + 1)
        why = ""
        try:
            async with self._client.get(replica.url + "/health", timeout=timeout) as r:
                ok = r.status == 200
                why = f"/health answered {r.status}"
            if ok:
                async with self._client.get(replica.url + "/v1/models", timeout=timeout) as m:
                    m.raise_for_status()
                    replica.models = parse_models(await m.json(content_type=None))
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            ok, why = False, f"no answer within {timeout.total:g}s"
        except Exception as e:  # noqa: BLE001 - a malformed answer must not stop probing for good
            ok, why = False, _describe(e)
        if not ok:
            self._metrics.probe_failures.labels(replica.label).inc()
        self.set_health(replica, ok, why or "probe passed")

    def set_health(self, replica: Replica, ok: bool, why: str = "") -> None:
        if replica.gone:  # a probe or request that outlived the replica: keep its series removed
            return
        if ok and not replica.healthy:
            log.info("engine %s is healthy (models: %s)", replica.label, [m["id"] for m in replica.models])
        elif not ok and replica.healthy:
            log.warning("engine %s is down: %s", replica.label, why)
        replica.healthy = ok
        self._metrics.engine_healthy.labels(replica.label).set(1 if ok else 0)
        self._changed.set()

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(r) for r in self.replicas))

    async def _loop(self) -> None:
        while True:
            try:
                await self.probe_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - probe() does not raise; a bug here must not end probing
                log.exception("health probe round failed")
            await asyncio.sleep(self._interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_healthy(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.any_healthy():
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                return False
        return True

    # ---- membership (discovery) ---------------------------------------------------------------
    def find(self, url: str) -> Replica | None:
        return next((r for r in self.replicas + self.draining if r.url == url), None)

    def add(self, url: str) -> Replica | None:
        """Make `url` a member (not routable until a probe passes); a draining one comes back as it is.
        Returns the replica when it is new or came back from draining (probe it), None when already a member."""
        r = self.find(url)
        if r is not None and not r.draining:
            return None
        if r is None:
            r = Replica(url)
            self._gauges[r] = self._metrics.engine_in_flight.labels(r.label)
            self._metrics.engine_healthy.labels(r.label).set(0)
        else:
            self.draining.remove(r)
            r.draining = False
            log.info("engine %s is back before it finished draining", r.label)
        self.replicas.append(r)
        self._changed.set()
        return r

    def drain(self, url: str) -> None:
        """No new requests for `url`; it is forgotten once its in-flight requests have finished."""
        r = self.find(url)
        if r is None or r.draining:
            return
        self.replicas.remove(r)
        r.draining = True
        self.draining.append(r)
        log.info("engine %s left the pool; draining %d in-flight request(s)", r.label, r.in_flight)
        self._changed.set()
        if r.in_flight == 0:
            self._forget(r)

    def _forget(self, r: Replica) -> None:
        self.draining.remove(r)
        r.gone, r.healthy = True, False
        m = self._metrics
        m.engine_in_flight.remove(r.label)
        m.engine_healthy.remove(r.label)
        m.upstream_errors.remove_by_labels({"replica": r.label})
        m.probe_failures.remove_by_labels({"replica": r.label})
        del self._gauges[r]
        log.info("engine %s drained", r.label)

    # ---- routing ------------------------------------------------------------------------------
    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    def models(self) -> list[dict]:
        """The union of the healthy engines' models, first engine's entry wins on duplicates."""
        seen: dict[str, dict] = {}
        for r in self.replicas:
            if r.healthy:
                for m in r.models:
                    seen.setdefault(m["id"], m)
        return list(seen.values())

    def default_model(self) -> str | None:
        ids = [m["id"] for m in self.models()]
        return ids[0] if len(ids) == 1 else None

    def pick(self, model: str, exclude: set[Replica] | frozenset = frozenset()) -> Replica:
        """Least in-flight healthy replica serving `model`; ties go to the earliest listed."""
        if not self.any_healthy():
            raise APIError(503, "no healthy engine is available; try again shortly", code="engine_unavailable")
        candidates = [r for r in self.replicas if r.healthy and r.serves(model)]
        if not candidates:
            if any(r.healthy and r.serves(model) for r in self.replicas if r in exclude) or exclude:
                raise APIError(503, f"no healthy engine left for model '{model}'", code="engine_unavailable")
            raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        candidates = [r for r in candidates if r not in exclude]
        if not candidates:
            raise APIError(503, f"no healthy engine left for model '{model}'", code="engine_unavailable")
        return min(candidates, key=lambda r: r.in_flight)

    def acquire(self, r: Replica) -> None:
        r.in_flight += 1
        self._gauges[r].set(r.in_flight)

    def release(self, r: Replica) -> None:
        r.in_flight -= 1
        self._gauges[r].set(r.in_flight)
        if r.draining and r.in_flight == 0:
            self._forget(r)


def parse_models(payload) -> list[dict]:
    """The model entries of a /v1/models answer: dicts with a string id; anything else is ignored.
    Not a list at all is a failed probe (ValueError)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError(f"/v1/models answered without a 'data' list: {type(data).__name__}")
    return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:200]}"
