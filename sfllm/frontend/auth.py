"""The API key check: every route but the probes (/health, /ready, /metrics) needs it."""
from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from sfllm.frontend.errors import AuthenticationError
from sfllm.frontend.request_gate import PROBE_PATHS


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` must carry the configured key.

    A plain ASGI middleware, so it answers before the body is read or validated (an
    unauthenticated client learns nothing about its request) and never wraps streams."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = _digest(api_key.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PROBE_PATHS:
            authorization = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            scheme, _, token = authorization.strip().partition(b" ")
            # The scheme's name is case-insensitive (RFC 7235). Digests compared in constant time: the response
            # time reveals neither how much of a guess was right nor the key's length.
            key_matches = hmac.compare_digest(_digest(token.lstrip(b" ")), self._expected)
            if not (key_matches and scheme.lower() == b"bearer"):
                await AuthenticationError().response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
