"""POST /v1/completions: raw prompts in, text out, whole or streamed."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from sfllm.frontend.choice_events import choice_events
from sfllm.frontend.choice_generation import UsageTally, generate_choices, high_priority_trace
from sfllm.frontend.choices import ChoiceDelta, plan_choices
from sfllm.frontend.engine_client import EngineClient
from sfllm.frontend.errors import InvalidRequestError
from sfllm.frontend.http_responses import EventStreamResponse, sse_event, start_event_stream, until_disconnect
from sfllm.frontend.logprobs_format import (TextOffsets, completion_logprobs, extend_completion_logprobs,
                                            prompt_completion_logprobs, prompt_logprobs_by_token)
from sfllm.frontend.metrics import FrontendMetrics, RequestOutcome, request_outcome
from sfllm.frontend.openai_protocol import CompletionRequest
from sfllm.frontend.openai_responses import CompletionChoice, CompletionLogprobs, CompletionResponse, PromptLogprobs
from sfllm.frontend.request_checks import (RequestLimits, check_model, check_prompt_token_ids, check_unicode,
                                           connected_hello, default_budget, request_ids, resolve_max_tokens,
                                           resolve_priority)
from sfllm.frontend.tokenizer import Tokenizer

# OpenAI's default for /v1/completions.
DEFAULT_MAX_TOKENS = 16


class _ChoiceText:
    """A choice's text and logprobs as they build up; `text_offset` counts from the echoed prompt, whose
    tokens' logprobs (`echo` with `logprobs`) come first."""

    def __init__(self, index: int, echo: str, echo_logprobs: bool, prompt_logprobs_asked: bool,
                 return_token_ids: bool = False, tokens_as_ids: bool = False) -> None:
        self.index = index
        self.echo = echo
        self.echo_logprobs = echo_logprobs
        self.prompt_logprobs_asked = prompt_logprobs_asked  # the extension, not only echo's logprobs
        self.return_token_ids = return_token_ids
        self.tokens_as_ids = tokens_as_ids  # return_tokens_as_token_ids
        self.prompt_token_ids: list[int] | None = None
        self.token_ids: list[int] | None = [] if return_token_ids else None
        self.started = False
        self.text = echo
        self.text_offsets: TextOffsets | None = None  # of the generated tokens, from the first delta on
        self.logprobs: CompletionLogprobs | None = None
        self.prompt_logprobs: PromptLogprobs | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def add(self, delta: ChoiceDelta, tokenizer: Tokenizer) -> CompletionChoice:
        """Record `delta`; returns what it adds, echo included the first time."""
        text = delta.text if self.started else self.echo + delta.text
        first = not self.started
        self.started = True
        if self.token_ids is not None:
            self.token_ids += delta.token_ids
            self.prompt_token_ids = delta.prompt_token_ids
        self.text += delta.text
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        logprobs = None
        if self.echo_logprobs and delta.prompt_logprobs is not None:
            logprobs = prompt_completion_logprobs(tokenizer, delta.prompt_token_ids, delta.prompt_logprobs,
                                                  self.tokens_as_ids)
        if delta.logprobs is not None:
            if self.text_offsets is None:
                self.text_offsets = TextOffsets(tokenizer, len(self.echo))
            more = completion_logprobs(tokenizer, delta.token_ids, delta.logprobs, self.text_offsets,
                                       self.tokens_as_ids)
            if logprobs is None:
                logprobs = more
            else:
                extend_completion_logprobs(logprobs, more)
        if logprobs is not None:
            if self.logprobs is None:
                self.logprobs = CompletionLogprobs()
            extend_completion_logprobs(self.logprobs, logprobs)
        prompt_logprobs = None
        if delta.prompt_logprobs is not None and self.prompt_logprobs_asked:
            prompt_logprobs = prompt_logprobs_by_token(tokenizer, delta.prompt_token_ids, delta.prompt_logprobs)
            self.prompt_logprobs = prompt_logprobs
        return CompletionChoice(index=self.index, text=text, logprobs=logprobs, finish_reason=delta.finish_reason,
                                stop_reason=delta.stop_reason, prompt_logprobs=prompt_logprobs,
                                prompt_token_ids=delta.prompt_token_ids if first and self.return_token_ids else None,
                                token_ids=delta.token_ids if self.return_token_ids else None)

    def choice(self) -> CompletionChoice:
        """The whole choice."""
        return CompletionChoice(index=self.index, text=self.text, logprobs=self.logprobs,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                                prompt_logprobs=self.prompt_logprobs,
                                prompt_token_ids=self.prompt_token_ids, token_ids=self.token_ids)


async def _prompt_only(deltas: AsyncGenerator[ChoiceDelta, None]) -> AsyncGenerator[ChoiceDelta, None]:
    """The deltas without their generated tokens: each choice ends with "length" after none."""
    async with aclosing(deltas):
        async for delta in deltas:
            yield dataclasses.replace(delta, text="", token_ids=[], logprobs=None, num_output_tokens=0,
                                      finish_reason=None if delta.finish_reason is None else "length",
                                      matched_stop=None, stop_reason=None)


@dataclass
class CompletionGeneration:
    """A completion request started in the engine: its choices' deltas, and what reads them into an answer."""
    request_id: str
    prompt_token_ids: list[list[int]]
    engine_request_ids: list[str]  # a choice's, by its index
    deltas: AsyncGenerator[ChoiceDelta, None]  # lazy: the engine sees the request once they are read
    texts: list[_ChoiceText]
    tally: UsageTally
    outcome: RequestOutcome
    high_priority_trace: Callable[[], None] | None


class CompletionEndpoint:
    def __init__(self, served_model_name: str, engine: EngineClient, tokenizer: Tokenizer,
                 limits: RequestLimits | None = None, metrics: FrontendMetrics | None = None) -> None:
        self.served_model_name = served_model_name
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits or RequestLimits()
        self.metrics = metrics

    async def __call__(self, body: CompletionRequest, request: Request) -> JSONResponse | EventStreamResponse:
        completion = await self.start(body, request, "cmpl-")
        if body.stream:
            events = self._events(completion.request_id, completion.deltas, completion.texts, completion.tally,
                                  body.include_usage_in_stream(), body.usage_in_every_chunk(), completion.outcome)
            return await start_event_stream(request, events, completion.high_priority_trace)
        response = await until_disconnect(request, self._complete(completion.request_id, completion.deltas,
                                                                   completion.texts, completion.tally))
        return JSONResponse(response.model_dump(mode="json"))

    async def start(self, body: CompletionRequest, request: Request, id_prefix: str,
                    default_max_tokens: int = DEFAULT_MAX_TOKENS,
                    zero_max_tokens_scores_prompt: bool = False) -> CompletionGeneration:
        """Checks the request, tokenizes its prompts and starts their choices in the engine (also for SGLang's
        /generate, which reads the same generation its own way). A budget of 0 tokens scores the prompt alone with
        `echo`, or always with `zero_max_tokens_scores_prompt` (SGLang's `max_new_tokens` 0)."""
        arrival_time = time.time()
        check_model(body.model, self.served_model_name)
        answer_id, request_id = request_ids(request, id_prefix, body.request_id)
        outcome = request_outcome(request)
        priority = outcome.priority = resolve_priority(body.priority, request.headers.get("x-priority"))
        body.check_supported()
        echo_logprobs = bool(body.echo) and body.logprobs is not None
        prompt_logprobs_asked = body.prompt_logprobs is not None
        if echo_logprobs:  # the prompt's tokens with as many alternatives as the completion's
            body.prompt_logprobs = max(body.prompt_logprobs or 0, body.logprobs)
        raw_prompts = body.prompts()
        if not raw_prompts:
            raise InvalidRequestError("prompt is empty", param="prompt")
        self.limits.check_num_sequences(body.n or 1, len(raw_prompts))
        self.limits.check_stops(body.stop_strings(), body.stop_token_ids or [])
        check_unicode([prompt for prompt in raw_prompts if isinstance(prompt, str)], "prompt")
        check_unicode(body.stop_strings(), "stop")
        check_unicode(body.bad_words or [], "bad_words")
        prompts = [await self._token_ids(prompt, body.add_special_tokens is not False) for prompt in raw_prompts]
        hello = connected_hello(self.engine)
        max_context_length = hello.max_context_length
        if body.truncate_prompt_tokens is not None:
            cut = [body.truncated(prompt, max_context_length) for prompt in prompts]
            # an echo shows what the model read
            raw_prompts = [ids if len(ids) < len(full) else raw for raw, full, ids in zip(raw_prompts, prompts, cut)]
            prompts = cut
        for prompt in prompts:
            self.limits.check_prompt_length(len(prompt), "prompt")
        # a budget of 0 scores the prompt (lm-eval's loglikelihood, SGLang's select()): the engine samples one
        # token, as it cannot run a prompt without, and the answer leaves it out
        prompt_only = body.requested_max_tokens() == 0 and (bool(body.echo) or zero_max_tokens_scores_prompt)
        requested_max_tokens = 1 if prompt_only else body.requested_max_tokens()
        defaults = hello.sampling_defaults
        budget = default_budget(default_max_tokens, defaults)
        params = [body.sampling_params(resolve_max_tokens(requested_max_tokens, budget, len(prompt), max_context_length,
                                                          "prompt", self.limits.max_output_tokens,
                                                          body.max_tokens_field()),
                                       body.logprobs, self.tokenizer.vocab_size, encode=self.tokenizer.encode_text,
                                       defaults=defaults)
                  for prompt in prompts]
        choices = plan_choices(request_id, prompts, params, priority, arrival_time, body.constraint_field(),
                               body.cache_salt)
        texts = [_ChoiceText(choice.index, self._echo(raw_prompts[choice.prompt_index], prompts[choice.prompt_index])
                             if body.echo else "", echo_logprobs, prompt_logprobs_asked, bool(body.return_token_ids),
                             bool(body.return_tokens_as_token_ids))
                 for choice in choices]
        tally = UsageTally(prompts)
        deltas = generate_choices(self.engine, self.tokenizer, choices, self.metrics, self.limits.request_timeout_s)
        if prompt_only:
            deltas = _prompt_only(deltas)
        return CompletionGeneration(answer_id, prompts, [choice.request.request_id for choice in choices], deltas,
                                    texts, tally, outcome,
                                    high_priority_trace(request_id, priority, arrival_time))

    async def _token_ids(self, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
        token_ids = await self.tokenizer.encode_async(prompt, add_special_tokens) if isinstance(prompt, str) else prompt
        check_prompt_token_ids(token_ids, self.tokenizer.vocab_size, "prompt")
        return token_ids

    def _echo(self, raw_prompt: str | list[int], token_ids: list[int]) -> str:
        if isinstance(raw_prompt, str):
            return raw_prompt
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    async def _complete(self, request_id: str, deltas: AsyncGenerator[ChoiceDelta, None], texts: list[_ChoiceText],
                        tally: UsageTally) -> CompletionResponse:
        async with aclosing(deltas):
            async for delta in deltas:
                texts[delta.index].add(delta, self.tokenizer)
                tally.record(delta)
        return CompletionResponse(id=request_id, model=self.served_model_name,
                                  choices=[text.choice() for text in texts], usage=tally.usage())

    def _events(self, request_id: str, deltas: AsyncGenerator[ChoiceDelta, None], texts: list[_ChoiceText],
                tally: UsageTally, include_usage: bool, usage_in_every_chunk: bool,
                outcome: RequestOutcome) -> AsyncGenerator[str, None]:
        created = int(time.time())

        def events_of(delta: ChoiceDelta) -> list[str]:
            choice = texts[delta.index].add(delta, self.tokenizer)
            tally.record(delta)
            if not (choice.text or choice.logprobs is not None or choice.finish_reason is not None
                    or choice.token_ids or choice.prompt_token_ids is not None):
                return []
            chunk = CompletionResponse(id=request_id, created=created, model=self.served_model_name, choices=[choice],
                                       usage=tally.usage() if usage_in_every_chunk else None)
            return [sse_event(chunk.model_dump_json())]

        def usage_event() -> str:
            return sse_event(CompletionResponse(id=request_id, created=created, model=self.served_model_name,
                                                choices=[], usage=tally.usage()).model_dump_json())

        return choice_events(deltas, events_of, usage_event if include_usage else None, outcome)
