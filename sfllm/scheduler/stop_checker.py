"""Whether a request is done after a new token: the engine's own stop conditions.

Stop strings need text and are the frontend's; they reach the engine as aborts."""
from __future__ import annotations

from sfllm.scheduler.request import Request


class StopChecker:
    def __init__(self, eos_token_ids: list[int], max_context_length: int) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context_length = max_context_length

    def finish_reason(self, request: Request, token: int) -> str | None:
        params = request.params
        if token in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if len(request.output_token_ids) >= params.max_tokens:
            return "length"
        if request.num_tokens >= self.max_context_length:
            return "length"
        return None
