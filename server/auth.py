"""API-key check as a pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects).
Only SHA-256 hashes of the keys are held (config.hash_key); a presented key is hashed and compared in
constant time against every one of them."""
from __future__ import annotations

import hashlib
import hmac

from .errors import APIError
from .http_common import send_json

OPS_PATHS = ("/health", "/ready", "/metrics")
KEY_SCOPE = "leanserve.api_key"  # scope entry: the id of the key the request came with


class APIKeyAuth:
    def __init__(self, app, keys: list[str], protect_ops: bool = False):
        """keys: "sha256:HEX" hashes (what Settings.api_keys holds)."""
        self.app = app
        self.keys = [bytes.fromhex(k.removeprefix("sha256:")) for k in keys]
        self.protect_ops = protect_ops

    def _match(self, token: bytes) -> str | None:
        """The matching key's id (a prefix of its hash: for per-key limits, never the key), or None."""
        # Compare against every key without short-circuit: timing reveals neither key nor position.
        digest = hashlib.sha256(token).digest()
        found = None
        for k in self.keys:
            if hmac.compare_digest(digest, k):
                found = k
        return found.hex()[:16] if found is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or (scope["path"] in OPS_PATHS and not self.protect_ops):
            return await self.app(scope, receive, send)
        token = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    token = b""
                token = token.strip()
                break
        key = self._match(token) if token else None
        if key is not None:
            scope[KEY_SCOPE] = key
            return await self.app(scope, receive, send)
        msg = ("You didn't provide an API key. Provide it in the Authorization header (Bearer YOUR_KEY)."
               if not token else "Incorrect API key provided.")
        err = APIError(401, msg, code="invalid_api_key")
        await send_json(send, 401, err.body(), {"www-authenticate": "Bearer"})
