"""The relay routes in the gateway's own OpenAPI document (/openapi.json). RelayRoutes (pure ASGI) serves
them before FastAPI routes anything, so these declarations only describe them."""
from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from .errors import APIError
from .schema import ChatBody, CompletionBody


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 429, 502, 503, 504)}


def document_relay_routes(app: FastAPI) -> None:
    def unreachable():
        raise APIError(500, "relay route reached FastAPI")  # RelayRoutes answers these paths

    @app.post("/v1/chat/completions", responses=_ERRORS, summary="Create a chat completion (relayed to an engine)",
              description="OpenAI's chat completions; `stream: true` answers with server-sent events.")
    async def chat_completions(body: ChatBody):
        unreachable()

    @app.post("/v1/completions", responses=_ERRORS, summary="Create a completion (relayed to an engine)",
              description="OpenAI's legacy completions; `stream: true` answers with server-sent events.")
    async def completions(body: CompletionBody):
        unreachable()
