"""The API key check of the /v1 routes; /health, /metrics and the docs stay open for probes."""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from sfllm.frontend.errors import AuthenticationError

PROTECTED_PREFIX = "/v1/"


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` must carry the configured key.

    A plain ASGI middleware, so it answers before the body is read or validated (an
    unauthenticated client learns nothing about its request) and never wraps streams."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            presented = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            # Constant time, so the response time does not reveal how much of a guess was right.
            if not hmac.compare_digest(presented, self._expected):
                await AuthenticationError().response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
