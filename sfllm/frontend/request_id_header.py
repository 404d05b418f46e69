"""The client's X-Request-Id, echoed on the answer, as vLLM's --enable-request-id-headers and most proxies do: a
gateway or tracer matches the answer to what it sent (the answer's `id` carries it too: request_checks.request_ids)."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_HEADER = b"x-request-id"


class RequestIdHeaderMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers", ()) if scope["type"] == "http" else ()
        given = next((value for name, value in headers if name == _HEADER), None)
        if given is None:
            await self.app(scope, receive, send)
            return

        async def echoing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != _HEADER]
                message = {**message, "headers": [*headers, (_HEADER, given)]}
            await send(message)

        await self.app(scope, receive, echoing_send)
