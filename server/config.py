"""Every option is a LEANSERVE_* environment variable and a `leanserve serve` flag (see cli.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LEANSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the gateway listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the gateway listens on")
    engines: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="engine base URLs (comma-separated in the env var); empty, and no engine_dns = start the "
                    "embedded vLLM engine",
    )
    engine_dns: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="NAME:PORT names (e.g. a Kubernetes headless Service) re-resolved every health interval; "
                    "the engines at their addresses join and leave the pool (comma-separated in the env var)",
    )
    model: str = Field("", description="embedded engine: HF model directory (empty = the prepared default model)")
    served_model_name: str = Field("", description="embedded engine: name clients use (default: directory name)")
    engine_port: int = Field(8100, ge=1, le=65535, description="embedded engine: loopback port of the vLLM server")
    engine_dtype: str = Field("float32", description="embedded engine: --dtype passed to vLLM")
    engine_args: str = Field("", description="embedded engine: extra vLLM arguments, shell-quoted")
    kv_budget: int = Field(0, ge=0, description="embedded engine: bounded KV cache, retention budget M tokens per "
                           "request, layer and KV head (0 = unbounded, stock vLLM)")
    kv_buffer: int = Field(0, ge=0, description="embedded engine: tokens appended between compactions of the bounded "
                           "cache (0 = the gates' serving buffer)")
    retention_gates: str = Field("", description="embedded engine: retention-gate directory for --kv-budget "
                                 "(empty = the gates shipped for the model)")
    engine_start_timeout: float = Field(600.0, gt=0, description="seconds to wait for the engine's /health")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted API keys (comma-separated in the env var; a flag shows in the "
                                          "process list: prefer the env var or api_key_file); held as SHA-256 "
                                          "hashes; 'sha256:HEX' entries are hashes already; empty = no auth"
    )
    api_key_file: str = Field("", description="file with accepted API keys, one per line (or sha256:HEX); "
                              "added to api_keys")
    key_max_concurrency: int = Field(0, ge=0, description="requests in flight per API key; beyond that 429 "
                                     "(0 = no per-key limit)")
    key_tokens_per_minute: int = Field(0, ge=0, description="prompt + completion tokens per minute per API key; "
                                       "beyond that 429 with Retry-After (0 = no per-key limit)")
    protect_ops_endpoints: bool = Field(False, description="require an API key for /health, /ready and /metrics too")
    max_concurrency: int = Field(64, ge=1, description="requests served at once; more wait in the queue")
    max_queue: int = Field(256, ge=0, description="requests allowed to wait; beyond that 429")
    queue_timeout: float = Field(30.0, gt=0, description="seconds a request may wait in the queue before 429")
    retry_after: int = Field(1, ge=0, description="Retry-After seconds sent with 429")
    health_interval: float = Field(2.0, gt=0, description="seconds between engine health probes")
    upstream_connect_timeout: float = Field(5.0, gt=0, description="seconds to connect to an engine")
    upstream_timeout: float = Field(600.0, gt=0, description="seconds an engine may stay silent during a request "
                                    "(idle time between bytes)")
    upstream_first_token_timeout: float = Field(300.0, gt=0, description="seconds per attempt until a stream's "
                                                "first token (504, or another replica)")
    upstream_total_timeout: float = Field(1800.0, gt=0, description="seconds a request may take on the engines, "
                                          "all attempts together (504, or an error event once streaming)")
    upstream_retries: int = Field(2, ge=0, description="further replicas tried after a safe failure (connection "
                                  "refused, 502/503, timeout before anything reached the client)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest accepted request body")
    max_pending_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="request-body bytes being "
                                        "received at once, all clients together; beyond that 429")
    body_timeout: float = Field(30.0, gt=0, description="seconds a client may take to send its request body (408)")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client may take to send its request headers "
                                  "(a connection that sends nothing is closed then too)")
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line + headers, bytes (431)")
    max_headers: int = Field(100, ge=8, description="request headers per request (431)")
    max_connections: int = Field(2048, ge=1, description="open client connections; beyond that 503 and close")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds in-flight requests may run on after SIGTERM; "
                                  "then streams end with an error event + [DONE]")
    log_level: str = Field("info", description="gateway log level")
    log_format: Literal["text", "json"] = Field("text", description="gateway logs as text lines or one JSON "
                                                "object per line (request bodies are never logged)")
    # thought trimming (server/trimming/stream.py)
    trim_default: bool = Field(False, description="trim thinking of chat requests that do not set `trim`")
    trim_verifier_url: str = Field("", description="OpenAI-compatible server the 'model' trim verifier asks "
                                   "(empty = the engine serving the request)")
    trim_verifier_model: str = Field("", description="model the 'model' trim verifier asks (empty = the request's)")
    trim_verifier_timeout: float = Field(10.0, gt=0, description="seconds a 'model' verifier call may take; "
                                         "slower counts as no decision")

    @field_validator("engines", "api_keys", mode="before")
    @classmethod
    def _split_csv(cls, v):
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("engine_dns", mode="before")
    @classmethod
    def _split_each(cls, v):  # repeated flags may each hold a comma-separated list too
        items = [v] if isinstance(v, str) else list(v)
        return [s.strip() for item in items for s in str(item).split(",") if s.strip()]

    @field_validator("engine_dns")
    @classmethod
    def _name_port(cls, v: list[str]) -> list[str]:
        from .discovery import parse_target
        for target in v:
            parse_target(target)  # ValueError -> a validation error naming the bad entry
        return v

    @field_validator("engines")
    @classmethod
    def _strip_slash(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"engine URL must start with http:// or https://: {url!r}")
        return [u.rstrip("/") for u in v]

    @field_validator("api_keys")
    @classmethod
    def _hash_keys(cls, v: list[str]) -> list[str]:
        return [hash_key(k) for k in v]

    @model_validator(mode="after")
    def _read_key_file(self) -> "Settings":
        if self.api_key_file:
            try:
                lines = Path(self.api_key_file).expanduser().read_text().splitlines()
            except OSError as e:
                raise ValueError(f"cannot read api_key_file: {e}")
            keys = [hash_key(k.strip()) for k in lines if k.strip() and not k.startswith("#")]
            if not keys:
                raise ValueError(f"api_key_file {self.api_key_file} holds no key")
            self.api_keys = self.api_keys + [k for k in keys if k not in self.api_keys]
            self.api_key_file = ""  # read once: a copy of these settings must not add them again
        return self


def hash_key(key: str) -> str:
    """What the gateway keeps of an API key: its SHA-256 (keys are random tokens: no salt needed)."""
    if key.startswith("sha256:") and len(key) == 71:
        return key.lower()
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
