"""The FastAPI application: routes, error rendering, lifecycle of the engine pool."""
from __future__ import annotations

import contextlib
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .admission import Admission
from .auth import APIKeyAuth
from .config import Settings
from .errors import APIError, error_body
from .metrics import Metrics
from .relay import Gateway, RelayResponse
from .replicas import ReplicaPool
from .schema import parse_body


def _error(status: int, message: str, headers: dict | None = None, **kw) -> JSONResponse:
    return JSONResponse(error_body(status, message, **kw), status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()
    state: dict[str, Gateway] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        timeout = httpx.Timeout(settings.upstream_timeout, connect=settings.upstream_connect_timeout, pool=None)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            pool = ReplicaPool(settings.engines, client, metrics, settings.health_interval)
            await pool.probe_all()  # routable from the first request when engines are already up
            pool.start()
            admission = Admission(settings.max_concurrency, settings.max_queue, settings.queue_timeout,
                                  settings.retry_after, metrics)
            state["gw"] = Gateway(pool, admission, client, metrics)
            try:
                yield
            finally:
                await pool.stop()

    app = FastAPI(title="leanserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.gateway = state

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

    async def relay(request: Request, endpoint: str, path: str):
        arrival = time.perf_counter()
        raw = await _read_body(request, settings.max_body_bytes)
        body = parse_body(raw, endpoint)
        return RelayResponse(state["gw"], body, path, endpoint, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await relay(request, "chat", "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await relay(request, "completions", "/v1/completions")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": state["gw"].pool.models()}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        pool = state["gw"].pool
        engines = [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight} for r in pool.replicas]
        if not pool.any_healthy():
            body = error_body(503, "no healthy engine", code="engine_unavailable")
            body["engines"] = engines
            return JSONResponse(body, status_code=503)
        return {"status": "ready", "engines": engines}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if settings.api_keys:
        app.add_middleware(APIKeyAuth, keys=settings.api_keys, protect_ops=settings.protect_ops_endpoints)
    return app
