"""The FastAPI application: routes, error rendering, lifecycle of the engine pool."""
from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .admission import Admission
from .auth import APIKeyAuth
from .body_budget import BodyBudget
from .client_limits import ClientLimits, limited_protocol
from .config import Settings
from .discovery import DNSDiscovery, Resolver, getaddrinfo_resolver
from .errors import APIError, error_body
from .metrics import Metrics
from .drain import Drain
from .key_limits import KeyLimits
from .openapi_routes import document_relay_routes
from .relay import Deadlines, Gateway, RelayRoutes
from .replicas import ReplicaPool
from .trimming.stream import TrimService


def _error(status: int, message: str, headers: dict | None = None, **kw) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kw), status_code=status, headers=headers)


def create_app(settings: Settings, metrics: Metrics | None = None, resolver: Resolver | None = None) -> FastAPI:
    """`resolver` replaces the system resolver for engine_dns names (tests map names to loopback addresses)."""
    metrics = metrics or Metrics()
    state: dict[str, Gateway] = {}
    drain = Drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # sock_read bounds silence between bytes, not the whole (possibly long) generation.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.upstream_connect_timeout,
                                        sock_read=settings.upstream_timeout)
        # Idle pooled connections are dropped before uvicorn's (vLLM's) 5 s keep-alive closes them from its side.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=4)
        # We ask engines for identity encoding; a proxy that compresses anyway is decoded, not relayed corrupt.
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=True) as client:
            pool = ReplicaPool(settings.engines, client, metrics, settings.health_interval,
                               discovered=bool(settings.engine_dns))
            discovery = (DNSDiscovery(settings.engine_dns, pool, settings.health_interval,
                                      resolver or getaddrinfo_resolver)
                         if settings.engine_dns else None)
            await pool.probe_all()  # routable from the first request when engines are already up
            if discovery:
                await discovery.refresh()  # probes what it finds
            rounds = [asyncio.get_running_loop().create_task(discovery.run())] if discovery else []
            pool.start()
            admission = Admission(settings.max_concurrency, settings.max_queue, settings.queue_timeout,
                                  settings.retry_after, metrics)
            deadlines = Deadlines(first_token=settings.upstream_first_token_timeout,
                                  total=settings.upstream_total_timeout, retries=settings.upstream_retries,
                                  body=settings.body_timeout)
            bodies = BodyBudget(settings.max_pending_body_bytes, settings.retry_after, metrics)
            key_limits = (KeyLimits(settings.key_max_concurrency, settings.key_tokens_per_minute,
                                    settings.retry_after, metrics)
                          if settings.api_keys and (settings.key_max_concurrency or settings.key_tokens_per_minute)
                          else None)
            state["gw"] = Gateway(pool, admission, client, metrics, TrimService.from_settings(settings),
                                  deadlines=deadlines, drain=drain, bodies=bodies, key_limits=key_limits)
            try:
                yield
            finally:
                for t in rounds:
                    t.cancel()
                await asyncio.gather(*rounds, return_exceptions=True)
                await pool.stop()

    app = FastAPI(title="leanserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.gateway = state
    app.state.drain = drain
    # uvicorn's `http=`: header size/count/deadline and connection limits (server/client_limits.py)
    app.state.http_protocol = limited_protocol(ClientLimits(
        header_timeout=settings.header_timeout, max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers, max_connections=settings.max_connections), metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return _error(400, str(exc.errors()[0].get("msg", "invalid request")))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a bug of ours: still answer in OpenAI's shape
        return _error(500, f"internal gateway error: {type(exc).__name__}")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": state["gw"].pool.models()}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        pool = state["gw"].pool
        if drain.stopping:
            return JSONResponse(error_body(503, "the server is shutting down", code="shutting_down"), status_code=503)
        engines = [{"url": r.label, "healthy": r.healthy, "in_flight": r.in_flight, "draining": r.draining}
                   for r in pool.replicas + pool.draining]
        if not pool.any_healthy():
            body = error_body(503, "no healthy engine", code="engine_unavailable")
            body["engines"] = engines
            return JSONResponse(body, status_code=503)
        return {"status": "ready", "engines": engines}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    document_relay_routes(app)
    app.add_middleware(RelayRoutes, state=state, max_body_bytes=settings.max_body_bytes)
    if settings.api_keys:  # added last = outermost: runs before the relay routes
        app.add_middleware(APIKeyAuth, keys=settings.api_keys, protect_ops=settings.protect_ops_endpoints)
    return app
