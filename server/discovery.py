"""Engine discovery by DNS: keep the replica pool equal to the addresses a name resolves to.

Made for a Kubernetes headless Service, whose name resolves to the IPs of its ready pods. Every
`interval` seconds each NAME:PORT is resolved; an address that appears becomes http://IP:PORT, is
probed at once and admitted when healthy; one that disappears is drained (its in-flight streams
finish, it gets no new requests). Static --engine URLs are never touched.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Awaitable, Callable

from .replicas import ReplicaPool

log = logging.getLogger("leanserve.discovery")

# (host, port) -> the addresses it resolves to now. Raises socket.gaierror like getaddrinfo.
Resolver = Callable[[str, int], Awaitable[list[str]]]

# "No such name" and "name has no addresses" are answers: a headless Service with no ready pod gives
# one of them, so the set is empty. Every other failure (timeout, SERVFAIL) keeps the last answer.
_EMPTY_ANSWERS = {socket.EAI_NONAME} | ({socket.EAI_NODATA} if hasattr(socket, "EAI_NODATA") else set())


async def getaddrinfo_resolver(host: str, port: int) -> list[str]:
    """The system resolver (resolv.conf search domains, /etc/hosts), IPv4 and IPv6."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def parse_target(target: str) -> tuple[str, int]:
    """'NAME:PORT' -> (NAME, PORT); NAME may be a bracketed IPv6 literal."""
    host, sep, port = target.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"engine DNS target must be NAME:PORT with a port in 1..65535: {target!r}")
    return host, int(port)


def engine_url(address: str, port: int) -> str:
    ip = ipaddress.ip_address(address.split("%")[0])
    return f"http://[{address}]:{port}" if ip.version == 6 else f"http://{address}:{port}"


class DNSDiscovery:
    def __init__(self, targets: list[str], pool: ReplicaPool, interval: float,
                 resolver: Resolver = getaddrinfo_resolver):
        self.targets = [parse_target(t) for t in targets]
        self._pool = pool
        self._interval = interval
        self._resolve = resolver
        self._answers: dict[tuple[str, int], set[str]] = {}  # last answer per target, as engine URLs

    async def _lookup(self, host: str, port: int) -> set[str] | None:
        """The target's engine URLs now, or None when the resolver could not answer."""
        try:
            return {engine_url(a, port) for a in await self._resolve(host, port)}
        except socket.gaierror as e:
            if e.errno in _EMPTY_ANSWERS:
                return set()
            log.warning("resolving %s failed (%s); keeping its %d engine(s)", host, e,
                        len(self._answers.get((host, port), ())))
        except (OSError, ValueError) as e:
            log.warning("resolving %s failed (%r); keeping its %d engine(s)", host, e,
                        len(self._answers.get((host, port), ())))
        return None

    async def refresh(self) -> None:
        """Resolve every target once and bring the pool to the union of the answers."""
        answers = await asyncio.gather(*(self._lookup(h, p) for h, p in self.targets))
        for target, urls in zip(self.targets, answers):
            if urls is not None:
                if urls != self._answers.get(target):
                    log.info("%s:%d resolves to %d engine(s)", *target, len(urls))
                self._answers[target] = urls
        wanted = set().union(*self._answers.values()) if self._answers else set()
        new = [r for r in (self._pool.add(u) for u in sorted(wanted)) if r is not None]
        # Probe newcomers now, not at the next health round, and before draining the departed: when the
        # whole set is replaced, the old engines serve until the new ones are routable.
        await asyncio.gather(*(self._pool.probe(r) for r in new))
        static = self._pool.static_urls
        for r in list(self._pool.replicas):
            if r.url not in wanted and r.url not in static:
                self._pool.drain(r.url)

    async def run(self) -> None:
        """Refresh every interval until cancelled (the first refresh is the caller's, before serving)."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop discovery for the life of the gateway
                log.exception("engine discovery round failed")
