"""What gets into the API: nothing new while the server drains, no body over the size limit.

The probes (/health, /ready, /metrics) always pass, so a draining server can still tell
its load balancer that it is leaving; every other request is counted while it runs, so
the drain knows when the last one is done. A frontend handing over to its replacement
still serves every request on its open connections, but closes each after its answer.
"""
from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sfllm.frontend.errors import RequestTooLargeError, ServerDrainingError

PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


class DrainState:
    """Requests in progress, and whether the server stopped taking new ones (draining) or hands its
    clients over to another frontend on the same port (handing over)."""

    def __init__(self) -> None:
        self.draining = False
        self.handing_over = False
        self.in_flight = 0

    def start_draining(self) -> None:
        self.draining = True

    def start_handover(self) -> None:
        self.handing_over = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no request is in progress; False if some still are after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight


class RequestGateMiddleware:
    """Answers 503 while draining and 413 for a body over `max_body_bytes`, before any parsing.

    The body is read here (up to the limit) and handed on whole: a client that streams a
    chunked body without a Content-Length is held to the same limit."""

    def __init__(self, app: ASGIApp, drain: DrainState, max_body_bytes: int) -> None:
        self.app = app
        self.drain = drain
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.drain.handing_over:
            send = _closing_connection(send)
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await ServerDrainingError().response()(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            try:
                body = await self._read_body(scope, receive)
            except RequestTooLargeError as error:
                await error.response()(scope, receive, send)
                return
            if body is not None:  # else the client left while sending it
                await self.app(scope, _replay(body, receive), send)
        finally:
            self.drain.in_flight -= 1

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        value = next((v for name, v in scope["headers"] if name == b"content-length"), b"0")
        try:
            return int(value)
        except ValueError:
            return 0  # the HTTP server rejects a malformed length itself

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None if the client left; raises RequestTooLargeError past the limit."""
        if self._declared_length(scope) > self.max_body_bytes:
            raise RequestTooLargeError(self.max_body_bytes)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestTooLargeError(self.max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _closing_connection(send: Send) -> Send:
    """`send` with `Connection: close` on the response: the client's next request opens a new connection,
    which the frontends still accepting take."""

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return closing


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body in one message, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
