"""API-key check as a pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects).
Only SHA-256 hashes of the keys are held (config.hash_key); a presented key is hashed and compared in
constant time against every one of them."""
from __future__ import annotations

import hashlib
import hmac

from .errors import APIError
from .http_common import send_json

OPS_PATHS = ("/health", "/ready", "/metrics")


class APIKeyAuth:
    def __init__(self, app, keys: list[str], protect_ops: bool = False):
        """keys: "sha256:HEX" hashes (what Settings.api_keys holds)."""
        self.app = app
        self.keys = [bytes.fromhex(k.removeprefix("sha256:")) for k in keys]
        self.protect_ops = protect_ops

    def _valid(self, token: bytes) -> bool:
        # Compare against every key without short-circuit: timing reveals neither key nor position.
        digest = hashlib.sha256(token).digest()
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(digest, k)
        return ok

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
        if token and self._valid(token):
            return await self.app(scope, receive, send)
        msg = ("You didn't provide an API key. Provide it in the Authorization header (Bearer YOUR_KEY)."
               if not token else "Incorrect API key provided.")
        err = APIError(401, msg, code="invalid_api_key")
        await send_json(send, 401, err.body(), {"www-authenticate": "Bearer"})
