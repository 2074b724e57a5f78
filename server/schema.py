"""Validation of OpenAI request bodies at the gateway: catch malformed input with a clear 400 before it
costs an engine anything. Only the fields the gateway reads or that commonly go wrong are typed; every
other field passes through to vLLM untouched (extra="allow")."""
from __future__ import annotations

import json
import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from .errors import APIError
from .trimming.policy import TrimConfig, TrimConfigError

Number = StrictFloat  # strict: ints pass, bools and strings do not ("Input should be a valid number")
MAX_DEPTH = 64  # JSON nesting the gateway accepts: far beyond any OpenAI body, far below recursion limits
Role = Literal["developer", "system", "user", "assistant", "tool", "function"]  # OpenAI's roles


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    stream: StrictBool | None = None
    stream_options: dict[str, Any] | None = None
    n: StrictInt | None = Field(None, ge=1, le=128)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0)
    top_p: Number | None = Field(None, gt=0, le=1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    user: StrictStr | None = None
    # leanserve's own knobs (later features); typed here so a wrong type is a 400 at the gateway.
    top_h: Number | None = Field(None, gt=0, le=1)
    trim: StrictBool | dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Role


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)


class CompletionBody(_Body):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool | None = None


Endpoint = Literal["chat", "completions"]
_MODELS = {"chat": ChatBody, "completions": CompletionBody}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def engine_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body sent to vLLM: leanserve's top-level knobs move to where the engine reads them."""
    if "trim" in body:  # thought trimming is the gateway's own: vLLM never sees it
        body = {k: v for k, v in body.items() if k != "trim"}
    if body.get("top_h") is None:
        body.pop("top_h", None)
        return body
    body = dict(body)
    # Engine-side knobs travel in vllm_xargs and arrive in SamplingParams.extra_args.
    body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), "top_h": body.pop("top_h")}
    return body


def parse_body(raw: bytes, endpoint: Endpoint) -> tuple[dict[str, Any], Optional[TrimConfig]]:
    """(the body as a dict, original values, not re-serialised; the request's own trimming settings, None
    when it sets none), or a 400 APIError. An explicit `trim` is validated here, once."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise _too_deep()
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json")
    if (raw.count(b"[") + raw.count(b"{") > MAX_DEPTH) and _depth(body) > MAX_DEPTH:  # cheap bound first
        raise _too_deep()
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        _MODELS[endpoint].model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # Union members appear in `loc` as type tags ("str", "list[int]"): not part of the field path.
        param = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p))
        raise APIError(400, f"Invalid value for '{param}': {err['msg']}", param=param, code="invalid_value")
    return body, _trim_config(body, endpoint)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return f


def _too_deep() -> APIError:
    return APIError(400, f"The JSON body of your request is nested more than {MAX_DEPTH} levels deep.",
                    code="invalid_json")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            return d
        stack.extend((c, d + 1) for c in v if isinstance(c, (dict, list)))
    return deepest


def _trim_config(body: dict[str, Any], endpoint: Endpoint) -> Optional[TrimConfig]:
    """An explicit `trim` must be valid and applicable (the server default silently skips where it is not)."""
    if body.get("trim") is None:
        return None
    try:
        config = TrimConfig.from_request(body["trim"])
    except TrimConfigError as e:
        param = ".".join(["trim", e.field]) if e.field else "trim"
        raise APIError(400, f"Invalid value for '{param}': {e.message}", param=param, code="invalid_value")
    if not config.enabled:
        return config
    if endpoint != "chat":
        raise APIError(400, "thought trimming ('trim') is available on /v1/chat/completions only", param="trim",
                       code="unsupported_parameter")
    if (body.get("n") or 1) != 1:
        raise APIError(400, "thought trimming ('trim') needs n=1", param="trim", code="unsupported_parameter")
    return config
