"""Engine URLs as the gateway shows them (/ready, /metrics labels, logs): without credentials."""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """`url` without user:password@ and without a query string (tokens travel there too)."""
    try:
        p = urlsplit(url)
        host = p.hostname or ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{p.port}" if p.port else "") if "@" in p.netloc else p.netloc
    return urlunsplit((p.scheme, netloc, p.path, "", ""))
