"""A streamed answer's events, the same for /v1/completions and /v1/chat/completions.

Each delta becomes the endpoint's chunks; an error after the status line was sent becomes an
error event, as OpenAI sends it; then the usage chunk if asked for, and `data: [DONE]`.
"""
from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

from sfllm.frontend.choices import ChoiceDelta
from sfllm.frontend.errors import api_error_from
from sfllm.frontend.http_responses import SSE_DONE, sse_event
from sfllm.frontend.metrics import RequestOutcome


async def choice_events(deltas: AsyncGenerator[ChoiceDelta, None], events_of: Callable[[ChoiceDelta], list[str]],
                        usage_event: Callable[[], str] | None, outcome: RequestOutcome) -> AsyncGenerator[str, None]:
    """The events of `deltas`; `usage_event` (None: not asked for) makes the usage chunk at the end."""
    async with aclosing(deltas):
        for event in events_of(await anext(deltas)):  # an error here is the response's status, not an event
            yield event
        try:
            async for delta in deltas:
                for event in events_of(delta):
                    yield event
        except Exception as error:  # the status line is gone: report it in the stream
            api_error = api_error_from(error)
            outcome.stream_error_status, outcome.stream_error_code = api_error.status_code, api_error.code
            yield sse_event(json.dumps(api_error.body()))
            yield SSE_DONE
            return
    if usage_event is not None:
        yield usage_event()
    yield SSE_DONE
