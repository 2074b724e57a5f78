"""OpenAI's error shape, for every error the gateway returns or relays."""
from __future__ import annotations

import json
from typing import Any

# status → OpenAI error "type"
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """Raised anywhere in the gateway; rendered as OpenAI's error object with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def normalize_upstream_error(status: int, raw: bytes) -> dict:
    """vLLM's error bodies have changed shape across versions; clients get OpenAI's shape always."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and "message" in err:
            return error_body(status, str(err["message"]), param=err.get("param"), code=_str_or_none(err.get("code")))
        if "message" in data:  # old vLLM: {"object": "error", "message": ..., "type": ..., "code": ...}
            return error_body(status, str(data["message"]), param=data.get("param"), code=_str_or_none(data.get("code")))
        if "detail" in data:  # FastAPI default
            return error_body(status, json.dumps(data["detail"]) if not isinstance(data["detail"], str) else data["detail"])
    text = raw.decode("utf-8", "replace").strip()[:1000] or f"upstream returned HTTP {status}"
    return error_body(status, text)


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)
