"""What every generation request must pass before it reaches the engine."""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from sfllm.config import FrontendConfig
from sfllm.frontend.engine_client import EngineClient
from sfllm.frontend.errors import (ContextLengthExceededError, InvalidRequestError, ModelNotFoundError,
                                   ServiceUnavailableError)
from sfllm.messages import PRIORITIES, EngineHello, SamplingDefaults, priority_class
from sfllm.sampling_params import token_outside_vocabulary


# what an X-Request-Id may hold: the characters of UUIDs and of the ids gateways and tracers send, nothing a log line
# or a header could be split by
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_ids(request: Request, prefix: str, body_request_id: str | None = None) -> tuple[str, str]:
    """The answer's `id` and the base of its engine requests' ids: from the client's X-Request-Id, else vLLM's
    `request_id` field, as vLLM names its answers (the engine's ids add a random part: two clients may send the same
    id), else random. An id of other characters (a gateway's base64, say) is not refused: the answer gets a random
    one (the header still comes back as sent)."""
    given = request.headers.get("x-request-id") or body_request_id
    if given is None or not _CLIENT_REQUEST_ID.fullmatch(given):
        answer_id = f"{prefix}{uuid.uuid4().hex}"
        return answer_id, answer_id
    return f"{prefix}{given}", f"{prefix}{given}.{uuid.uuid4().hex[:12]}"


def check_model(requested: str | None, served_model_name: str) -> None:
    """`model` may be left out; if given it must name the one served model."""
    if requested is not None and requested != served_model_name:
        check_unicode([requested], "model")
        raise ModelNotFoundError(requested, served_model_name)


def resolve_priority(body_priority: str | int | None, header_priority: str | None) -> str:
    """The scheduling class: the body's `priority` (a class, or vLLM's integer) wins over the X-Priority header;
    normal if neither is given."""
    if body_priority is not None:
        return priority_class(body_priority)
    if header_priority is None:
        return "normal"
    priority = header_priority.strip().lower()
    if priority not in PRIORITIES:
        raise InvalidRequestError(f"X-Priority must be one of {', '.join(PRIORITIES)}; got {header_priority!r}",
                                  param="X-Priority")
    return priority


def connected_hello(engine: EngineClient) -> EngineHello:
    """What the connected engine said of its model; a 503 while none is connected."""
    if engine.hello is None or not engine.connected:
        raise ServiceUnavailableError(f"the engine at {engine.address} is not connected")
    return engine.hello


def default_budget(endpoint_default: int | None, defaults: SamplingDefaults) -> int | None:
    """A request's max_tokens where it names none: the endpoint's (None: the room the context leaves), or the
    model's generation config's max_new_tokens where smaller, as vLLM takes the smaller."""
    given = [budget for budget in (endpoint_default, defaults.max_tokens) if budget is not None]
    return min(given) if given else None


def check_unicode(texts: Iterable[str], param: str) -> None:
    """JSON can carry unpaired surrogates ("\\ud800"), which no tokenizer takes: a client mistake."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise InvalidRequestError(f"{param} holds an unpaired surrogate (\\u{ord(text[error.start]):04x}) at "
                                      f"character {error.start}; send valid Unicode text", param=param) from None


def check_unicode_within(value: Any, param: str) -> None:
    """check_unicode over every string in a JSON value: keys and values of its objects, items of its arrays."""
    check_unicode(_strings_within(value), param)


def _strings_within(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings_within(key)
            yield from _strings_within(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings_within(item)


def check_prompt_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    if not token_ids:
        raise InvalidRequestError(f"{param} is empty; it must hold at least one token", param=param)
    bad = token_outside_vocabulary(token_ids, vocab_size)
    if bad is not None:
        raise InvalidRequestError(f"{param} holds token id {bad}, outside the vocabulary [0, {vocab_size})",
                                  param=param)


def resolve_max_tokens(requested: int | None, default: int | None, num_prompt_tokens: int, max_context_length: int,
                       param: str, max_output_tokens: int | None = None, field: str = "max_tokens") -> int:
    """The completion's token budget: as requested (in the body's `field`), or the default clipped to the room left.

    `default` None means all the room the context leaves after the prompt; either way no
    more than `max_output_tokens`, the operator's limit."""
    room = max_context_length - num_prompt_tokens
    if requested is None:
        if room < 1:
            raise ContextLengthExceededError(num_prompt_tokens, None, max_context_length, param)
        budget = room if default is None else min(default, room)
        return budget if max_output_tokens is None else min(budget, max_output_tokens)
    if requested < 1:
        raise InvalidRequestError(f"{field} must be at least 1, got {requested}", param=field)
    if max_output_tokens is not None and requested > max_output_tokens:
        raise InvalidRequestError(f"{field} is {requested}, but this server generates at most {max_output_tokens} "
                                  "tokens per sequence (max_output_tokens).", param=field,
                                  code="max_tokens_too_large")
    if requested > room:
        raise ContextLengthExceededError(num_prompt_tokens, requested, max_context_length, param, field)
    return requested


@dataclass(frozen=True)
class RequestLimits:
    """The operator's bounds on one request; each one broken is a 400 that names it."""
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    max_n: int = 128
    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    request_timeout_s: float | None = None

    @classmethod
    def from_config(cls, config: FrontendConfig) -> RequestLimits:
        return cls(config.max_prompt_tokens, config.max_output_tokens, config.max_n, config.max_stop_sequences,
                   config.max_stop_sequence_chars, config.request_timeout_s)

    def check_prompt_length(self, num_tokens: int, param: str) -> None:
        if self.max_prompt_tokens is not None and num_tokens > self.max_prompt_tokens:
            raise InvalidRequestError(f"{param} has {num_tokens} tokens, but this server accepts at most "
                                      f"{self.max_prompt_tokens} (max_prompt_tokens).", param=param,
                                      code="prompt_too_long")

    def check_num_sequences(self, n: int, num_prompts: int) -> None:
        if n * num_prompts > self.max_n:
            raise InvalidRequestError(f"This request asks for {n * num_prompts} sequences (n = {n} for each of "
                                      f"{num_prompts} prompts), but this server generates at most {self.max_n} per "
                                      "request (max_n, capped by max_waiting_requests).", param="n",
                                      code="too_many_sequences")

    def check_stops(self, stop: list[str], stop_token_ids: list[int]) -> None:
        for param, count in (("stop", len(stop)), ("stop_token_ids", len(stop_token_ids))):
            if count > self.max_stop_sequences:
                raise InvalidRequestError(f"{param} has {count} entries, but this server accepts at most "
                                          f"{self.max_stop_sequences} (max_stop_sequences).", param=param,
                                          code="too_many_stop_sequences")
        longest = max(stop, key=len, default="")
        if len(longest) > self.max_stop_sequence_chars:
            raise InvalidRequestError(f"A stop string has {len(longest)} characters, but this server accepts at most "
                                      f"{self.max_stop_sequence_chars} (max_stop_sequence_chars).", param="stop",
                                      code="stop_sequence_too_long")
