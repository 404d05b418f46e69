"""One API request's choices streamed from the engine as text deltas (see choices.py), and its usage.

A choice is one sample of one prompt, one GenerateRequest to the engine. A stop string
ends it in the frontend, and closing its stream aborts it in the engine.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from sfllm.frontend.choices import Choice, ChoiceDecoder, ChoiceDelta
from sfllm.frontend.engine_client import EngineClient, EngineRequestError
from sfllm.frontend.errors import RequestTimeoutError
from sfllm.frontend.metrics import FrontendMetrics
from sfllm.frontend.openai_responses import PromptTokensDetails, Usage
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.structured_output import CONSTRAINT_PARAM

logger = logging.getLogger(__name__)


async def _generate_choice(engine: EngineClient, tokenizer: Tokenizer, choice: Choice,
                           metrics: FrontendMetrics | None) -> AsyncIterator[ChoiceDelta]:
    request = choice.request
    decoder = ChoiceDecoder(tokenizer, choice)
    first_token_time: float | None = None
    first_output = True
    async with aclosing(engine.submit(request)) as outputs:
        try:
            async for output in outputs:
                if first_output and output.token_ids:
                    first_output = False
                    if request.priority == "high" and logger.isEnabledFor(logging.DEBUG):
                        logger.debug("high-priority request %s: first output in the frontend at %.1f ms",
                                     request.request_id, 1e3 * (time.time() - request.arrival_time))
                    if metrics is not None:
                        first_token_time = metrics.first_token(request.arrival_time)
                delta = decoder.decode(output)
                yield delta
                if delta.finish_reason is not None:
                    if metrics is not None and first_token_time is not None:
                        metrics.sequence_finished(first_token_time, delta.num_prompt_tokens, delta.num_output_tokens)
                    return  # leaving `aclosing` aborts the engine's request if a stop string ended it
        except EngineRequestError as error:  # about the output's constraint: named by the field the client set
            if error.param == CONSTRAINT_PARAM and choice.constraint_field is not None:
                error.param = choice.constraint_field
            raise


def high_priority_trace(request_id: str, priority: str, arrival_time: float) -> Callable[[], None] | None:
    """For the debug log of a high-priority stream: logs when its first event was written."""
    if priority != "high" or not logger.isEnabledFor(logging.DEBUG):
        return None
    return lambda: logger.debug("high-priority request %s: first event written at %.1f ms", request_id,
                                1e3 * (time.time() - arrival_time))


async def generate_choices(engine: EngineClient, tokenizer: Tokenizer, choices: list[Choice],
                           metrics: FrontendMetrics | None = None,
                           timeout_s: float | None = None) -> AsyncIterator[ChoiceDelta]:
    """Deltas of all choices as they come; an engine error of any choice ends the whole stream.

    Closing or cancelling the iterator aborts every choice still running; so does running
    past `timeout_s`, which raises RequestTimeoutError."""
    if len(choices) == 1:
        deltas = _generate_choice(engine, tokenizer, choices[0], metrics)
    else:
        deltas = _merge_choices(engine, tokenizer, choices, metrics)
    if timeout_s is None:
        async with aclosing(deltas):
            async for delta in deltas:
                yield delta
        return
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aclosing(deltas):
        while True:
            timeout = asyncio.timeout_at(deadline)
            try:
                async with timeout:
                    delta = await anext(deltas)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if not timeout.expired():
                    raise
                raise RequestTimeoutError(timeout_s) from None
            yield delta


async def _merge_choices(engine: EngineClient, tokenizer: Tokenizer, choices: list[Choice],
                         metrics: FrontendMetrics | None) -> AsyncIterator[ChoiceDelta]:
    queue: asyncio.Queue[ChoiceDelta | Exception] = asyncio.Queue()

    async def forward(choice: Choice) -> None:
        try:
            async with aclosing(_generate_choice(engine, tokenizer, choice, metrics)) as deltas:
                async for delta in deltas:
                    queue.put_nowait(delta)
        except Exception as error:  # handed to the consumer, which raises it
            queue.put_nowait(error)

    tasks = [asyncio.create_task(forward(choice)) for choice in choices]
    try:
        running = len(choices)
        while running:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item.finish_reason is not None:
                running -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()


class UsageTally:
    """Token counts of one API request: each prompt once, every choice's output tokens.

    A prompt's cached tokens are those of its first finished choice; its other samples
    share that prefix by construction."""

    def __init__(self, prompts: list[list[int]]) -> None:
        self._num_prompt_tokens = sum(len(prompt) for prompt in prompts)
        self._num_output_tokens: dict[int, int] = {}
        self._num_cached_tokens: dict[int, int] = {}

    def record(self, delta: ChoiceDelta) -> None:
        self._num_output_tokens[delta.index] = delta.num_output_tokens
        if delta.finish_reason is not None:
            self._num_cached_tokens.setdefault(delta.prompt_index, delta.num_cached_tokens)

    def usage(self) -> Usage:
        completion_tokens = sum(self._num_output_tokens.values())
        return Usage(prompt_tokens=self._num_prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self._num_prompt_tokens + completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._num_cached_tokens.values())))
