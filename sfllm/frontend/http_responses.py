"""Getting answers to the HTTP client: server-sent events, and work dropped when the client leaves.

Both close their generation as soon as the client disconnects, which aborts the
engine's requests instead of computing tokens nobody will read.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


class ClientDisconnectedError(Exception):
    """The HTTP client went away before its answer was ready."""


def sse_event(json_text: str) -> str:
    return f"data: {json_text}\n\n"


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, unless the client disconnects first: then `work` is cancelled."""
    work_task = asyncio.ensure_future(work)
    disconnect_task = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait((work_task, disconnect_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect_task.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.wait((work_task,))  # its cleanup sends the aborts
    if work_task.cancelled():
        raise ClientDisconnectedError()
    return work_task.result()


class EventStreamResponse(StreamingResponse):
    """`text/event-stream` of already-formatted events; `events` is closed however the response ends."""

    def __init__(self, first_event: str, events: AsyncGenerator[str, None],
                 first_event_written: Callable[[], None] | None = None) -> None:
        self._events = events
        self._first_event_written = first_event_written
        super().__init__(self._body(first_event), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _body(self, first_event: str) -> AsyncIterator[str]:
        yield first_event
        if self._first_event_written is not None:  # asked for the next chunk: the first one was sent
            self._first_event_written()
        async for event in self._events:
            yield event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


async def start_event_stream(request: Request, events: AsyncGenerator[str, None],
                             first_event_written: Callable[[], None] | None = None) -> EventStreamResponse:
    """Wait for the first event before answering, so an error before it gets its own HTTP status."""
    first_event = await until_disconnect(request, anext(events))
    return EventStreamResponse(first_event, events, first_event_written)
