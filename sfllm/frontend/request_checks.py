"""What every generation request must pass before it reaches the engine."""
from __future__ import annotations

from sfllm.frontend.engine_client import EngineClient
from sfllm.frontend.errors import (ContextLengthExceededError, InvalidRequestError, ModelNotFoundError,
                                   ServiceUnavailableError)
from sfllm.messages import PRIORITIES


def check_model(requested: str | None, served_model_name: str) -> None:
    """`model` may be left out; if given it must name the one served model."""
    if requested is not None and requested != served_model_name:
        raise ModelNotFoundError(requested, served_model_name)


def resolve_priority(body_priority: str | None, header_priority: str | None) -> str:
    """The body's `priority` wins over the X-Priority header; normal if neither is given."""
    if body_priority is not None:
        return body_priority
    if header_priority is None:
        return "normal"
    priority = header_priority.strip().lower()
    if priority not in PRIORITIES:
        raise InvalidRequestError(f"X-Priority must be one of {', '.join(PRIORITIES)}; got {header_priority!r}",
                                  param="X-Priority")
    return priority


def engine_context_length(engine: EngineClient) -> int:
    if engine.hello is None or not engine.connected:
        raise ServiceUnavailableError(f"the engine at {engine.address} is not connected")
    return engine.hello.max_context_length


def check_prompt_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    if not token_ids:
        raise InvalidRequestError(f"{param} is empty; it must hold at least one token", param=param)
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"{param} holds token id {bad}, outside the vocabulary [0, {vocab_size})",
                                  param=param)


def resolve_max_tokens(requested: int | None, default: int | None, num_prompt_tokens: int, max_context_length: int,
                       param: str) -> int:
    """The completion's token budget: as requested, or the default clipped to the room left.

    `default` None means all the room the context leaves after the prompt."""
    room = max_context_length - num_prompt_tokens
    if requested is None:
        if room < 1:
            raise ContextLengthExceededError(num_prompt_tokens, None, max_context_length, param)
        return room if default is None else min(default, room)
    if requested > room:
        raise ContextLengthExceededError(num_prompt_tokens, requested, max_context_length, param)
    return requested
