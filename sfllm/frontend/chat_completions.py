"""POST /v1/chat/completions: messages through the chat template in, an assistant message out (its text, or
the tool calls read from it)."""
from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse

from sfllm.frontend.choice_events import choice_events
from sfllm.frontend.choice_generation import UsageTally, generate_choices, high_priority_trace
from sfllm.frontend.choices import ChoiceDelta, plan_choices
from sfllm.frontend.engine_client import EngineClient
from sfllm.frontend.http_responses import EventStreamResponse, sse_event, start_event_stream, until_disconnect
from sfllm.frontend.logprobs_format import chat_logprobs, prompt_logprobs_by_token
from sfllm.frontend.metrics import FrontendMetrics, RequestOutcome, request_outcome
from sfllm.frontend.openai_protocol import ChatCompletionRequest
from sfllm.frontend.openai_responses import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                                             ChatDelta, ChatLogprobs, ChatResponseMessage, PromptLogprobs)
from sfllm.frontend.reasoning_parser import ReasoningParser, thought_before_grammar
from sfllm.frontend.request_checks import (RequestLimits, check_model, check_prompt_token_ids, check_unicode,
                                           check_unicode_within, connected_hello, default_budget, request_ids,
                                           resolve_max_tokens, resolve_priority)
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.frontend.tool_call_parser import Llama3JsonToolCallParser, ToolCallDelta, ToolCallParser
from sfllm.frontend.tool_protocol import ChatToolCall, FunctionCall, FunctionCallDelta, ToolCallChunk
from sfllm.frontend.tools import ChatTools
from sfllm.sampling_params import SamplingParams

# The prompt's end that tells whether its template opened a think block for the answer
PROMPT_TAIL_TOKENS = 16


async def chat_prompt(tokenizer: Tokenizer, body: ChatCompletionRequest, tools: ChatTools) -> list[int]:
    """The token ids of a chat request's conversation, its tools described as the template wants them."""
    messages = tools.template_messages(body.messages, tokenizer.chat_template.takes_tools)
    template_tools, options = tools.template_tools(), body.template_options()
    # every text a template may render (a history's reasoning_content and call arguments too) must be encodable
    check_unicode_within(template_tools, "tools")  # first: a template without tools gets them in a message
    check_unicode_within(messages, "messages")
    check_unicode_within(options["variables"], "chat_template_kwargs")
    check_unicode_within(options["documents"], "documents")
    prompt = await tokenizer.apply_chat_template_async(messages, template_tools, **options,
                                                       add_special_tokens=bool(body.add_special_tokens))
    check_prompt_token_ids(prompt, tokenizer.vocab_size, "messages")
    return prompt


class ChatCompletionEndpoint:
    def __init__(self, served_model_name: str, engine: EngineClient, tokenizer: Tokenizer,
                 limits: RequestLimits | None = None, metrics: FrontendMetrics | None = None,
                 reasoning_parser: str | None = None, tool_call_parser: str | None = None) -> None:
        """`tool_call_parser`: the format the model's calls are read in where its template renders tools (None: the
        one the template asks for); a template that does not gets sfllm's description of them, in Hermes'."""
        self.served_model_name = served_model_name
        self.reasoning_parser = reasoning_parser
        self.tool_call_parser = tool_call_parser
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits or RequestLimits()
        self.metrics = metrics

    async def __call__(self, body: ChatCompletionRequest, request: Request) -> JSONResponse | EventStreamResponse:
        chat = await self.start(body, request, "chatcmpl-")
        if body.stream:
            events = self._events(chat.request_id, chat.deltas, chat.messages, chat.tally, chat.shape,
                                  body.include_usage_in_stream(), body.usage_in_every_chunk(), chat.outcome)
            return await start_event_stream(request, events, chat.high_priority_trace)
        response = await until_disconnect(request, self._complete(chat.request_id, chat.deltas, chat.messages,
                                                                   chat.tally, chat.shape))
        return JSONResponse(response.model_dump(mode="json"))

    async def start(self, body: ChatCompletionRequest, request: Request, id_prefix: str) -> ChatGeneration:
        """Checks the request, renders its prompt and starts its choices in the engine (also for /v1/responses,
        which reads the same generation its own way)."""
        arrival_time = time.time()
        check_model(body.model, self.served_model_name)
        answer_id, request_id = request_ids(request, id_prefix, body.request_id)
        outcome = request_outcome(request)
        priority = outcome.priority = resolve_priority(body.priority, request.headers.get("x-priority"))
        body.check_supported()
        num_top_logprobs = body.num_logprobs()
        self.limits.check_num_sequences(body.n or 1, 1)
        self.limits.check_stops(body.stop_strings(), body.stop_token_ids or [])
        tools = ChatTools(body)
        check_unicode(body.stop_strings(), "stop")
        check_unicode(body.bad_words or [], "bad_words")
        prompt = await chat_prompt(self.tokenizer, body, tools)
        hello = connected_hello(self.engine)
        max_context_length = hello.max_context_length
        prompt = body.truncated(prompt, max_context_length)
        self.limits.check_prompt_length(len(prompt), "messages")
        defaults = hello.sampling_defaults
        max_tokens = resolve_max_tokens(body.requested_max_tokens(), default_budget(None, defaults), len(prompt),
                                        max_context_length, "messages", self.limits.max_output_tokens,
                                        body.max_tokens_field())
        template = self.tokenizer.chat_template
        call_format = (self.tool_call_parser if self.tool_call_parser and template.takes_tools
                       else template.tool_call_format)
        tool_grammar = tools.structured_output(call_format)
        params = body.sampling_params(max_tokens, num_top_logprobs, self.tokenizer.vocab_size, tool_grammar,
                                      encode=self.tokenizer.encode_text, defaults=defaults)
        prompt_tail = (self.tokenizer.decode(prompt[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
                       if self.reasoning_parser else "")
        continued = body.messages[-1].text() if body.continue_final_message else None
        if self.reasoning_parser and params.structured_output is not None:
            thought = thought_before_grammar(self.reasoning_parser, prompt_tail, self.tokenizer.encode_text,
                                             continued)
            params.structured_output = msgspec.structs.replace(params.structured_output, after_thought=thought)
        choices = plan_choices(request_id, [prompt], [params], priority, arrival_time,
                               "tools" if tool_grammar is not None else body.constraint_field(), body.cache_salt)
        constrained = params.structured_output is not None and params.structured_output.after_thought is None
        last = body.messages[-1]
        echoed = last.text() if body.echo and last.role == "assistant" else ""
        messages_out = [AssistantMessage(tools.parser(call_format),
                                         ReasoningParser(self.reasoning_parser, prompt_tail, constrained, continued)
                                         if self.reasoning_parser else None, body.include_reasoning is not False,
                                         one_call=not tools.parallel, echoed=echoed)
                        for _ in choices]
        shape = AnswerShape(num_top_logprobs, bool(body.return_token_ids), bool(body.return_tokens_as_token_ids))
        deltas = generate_choices(self.engine, self.tokenizer, choices, self.metrics, self.limits.request_timeout_s)
        return ChatGeneration(answer_id, deltas, messages_out, UsageTally([prompt]), shape, outcome,
                              high_priority_trace(request_id, priority, arrival_time), params)

    def _logprobs(self, delta: ChoiceDelta, shape: AnswerShape) -> ChatLogprobs | None:
        if shape.num_top_logprobs is None or delta.logprobs is None:
            return None
        return chat_logprobs(self.tokenizer, delta.token_ids, delta.logprobs, shape.num_top_logprobs,
                             shape.tokens_as_ids)

    async def _complete(self, request_id: str, deltas: AsyncGenerator[ChoiceDelta, None],
                        messages: list[AssistantMessage], tally: UsageTally,
                        shape: AnswerShape) -> ChatCompletionResponse:
        logprobs: list[ChatLogprobs | None] = [None] * len(messages)
        prompt_logprobs: list[PromptLogprobs | None] = [None] * len(messages)
        token_ids: list[list[int] | None] = [[] if shape.return_token_ids else None for _ in messages]
        prompt_token_ids = None
        async with aclosing(deltas):
            async for delta in deltas:
                tally.record(delta)
                messages[delta.index].add(delta)
                if shape.return_token_ids:
                    token_ids[delta.index] += delta.token_ids
                    prompt_token_ids = delta.prompt_token_ids
                if delta.prompt_logprobs is not None:
                    prompt_logprobs[delta.index] = self._prompt_logprobs(delta)
                more = self._logprobs(delta, shape)
                if more is not None:
                    so_far = logprobs[delta.index] or ChatLogprobs(content=[])
                    so_far.content = (so_far.content or []) + (more.content or [])
                    logprobs[delta.index] = so_far
        choices = [ChatChoice(index=index, message=message.message(), logprobs=logprobs[index],
                              finish_reason=message.finish_reason, stop_reason=message.stop_reason,
                              prompt_logprobs=prompt_logprobs[index],
                              token_ids=token_ids[index])
                   for index, message in enumerate(messages)]
        return ChatCompletionResponse(id=request_id, model=self.served_model_name, choices=choices, usage=tally.usage(),
                                      prompt_token_ids=prompt_token_ids)

    def _prompt_logprobs(self, delta: ChoiceDelta) -> PromptLogprobs:
        return prompt_logprobs_by_token(self.tokenizer, delta.prompt_token_ids, delta.prompt_logprobs)

    def _events(self, request_id: str, deltas: AsyncGenerator[ChoiceDelta, None], messages: list[AssistantMessage],
                tally: UsageTally, shape: AnswerShape, include_usage: bool, usage_in_every_chunk: bool,
                outcome: RequestOutcome) -> AsyncGenerator[str, None]:
        created = int(time.time())
        started: set[int] = set()

        def chunk(choice: ChatChunkChoice, prompt_token_ids: list[int] | None = None) -> str:
            usage = tally.usage() if usage_in_every_chunk else None
            return sse_event(ChatCompletionChunk(id=request_id, created=created, model=self.served_model_name,
                                                 choices=[choice], usage=usage, prompt_token_ids=prompt_token_ids
                                                 ).model_dump_json())

        def usage_event() -> str:
            return sse_event(ChatCompletionChunk(id=request_id, created=created, model=self.served_model_name,
                                                 choices=[], usage=tally.usage()).model_dump_json())

        def events_of(delta: ChoiceDelta) -> list[str]:
            events = []
            if delta.index not in started:
                started.add(delta.index)  # each choice opens with the assistant role, as OpenAI's do
                events.append(chunk(ChatChunkChoice(index=delta.index, delta=ChatDelta(role="assistant", content="")),
                                    delta.prompt_token_ids if shape.return_token_ids else None))
                if messages[delta.index].echoed:  # vLLM's echo: the continued message first, in a chunk of its own
                    events.append(chunk(ChatChunkChoice(index=delta.index,
                                                        delta=ChatDelta(content=messages[delta.index].echoed))))
            tally.record(delta)  # after the role chunk: its running usage counts no token yet, as vLLM's
            logprobs = self._logprobs(delta, shape)
            message = messages[delta.index]
            thought, text, calls = message.add(delta)
            token_ids = delta.token_ids if shape.return_token_ids else None
            if thought or text or calls or logprobs is not None or delta.finish_reason is not None or token_ids:
                chunks = [ToolCallChunk(index=call.index, id=call.id, type="function" if call.id else None,
                                        function=FunctionCallDelta(name=call.name, arguments=call.arguments))
                          for call in calls]
                events.append(chunk(ChatChunkChoice(
                    index=delta.index, delta=ChatDelta(content=text or None, reasoning_content=thought or None,
                                                       tool_calls=chunks or None),
                    logprobs=logprobs, finish_reason=message.finish_reason, stop_reason=message.stop_reason,
                    prompt_logprobs=self._prompt_logprobs(delta) if delta.prompt_logprobs is not None else None,
                    token_ids=token_ids)))
            return events

        return choice_events(deltas, events_of, usage_event if include_usage else None, outcome)


@dataclass
class ChatGeneration:
    """A chat request started in the engine: its choices' deltas, and what reads them into an answer."""
    request_id: str
    deltas: AsyncGenerator[ChoiceDelta, None]
    messages: list[AssistantMessage]
    tally: UsageTally
    shape: AnswerShape
    outcome: RequestOutcome
    high_priority_trace: Callable[[], None] | None
    params: SamplingParams  # what the choices sample with: the request's values, else the model's, else sfllm's


@dataclass(frozen=True)
class AnswerShape:
    """What the client asked the answer to carry beside its message: logprobs (and how they name tokens), ids."""
    num_top_logprobs: int | None
    return_token_ids: bool
    tokens_as_ids: bool  # vLLM's return_tokens_as_token_ids


class AssistantMessage:
    """One choice's assistant message as it streams in: its reasoning, if a parser reads one, its text, and with tools
    on, the calls read from the text after the reasoning. With `one_call` (parallel_tool_calls false) only the first
    call is kept, as vLLM does: a model may write several whatever the request says. `echoed`: the text the answer
    repeats first (vLLM's chat `echo` of a continued assistant message)."""

    def __init__(self, parser: ToolCallParser | Llama3JsonToolCallParser | None,
                 reasoning_parser: ReasoningParser | None = None, include_reasoning: bool = True,
                 one_call: bool = False, echoed: str = "") -> None:
        self.parser = parser
        self.echoed = echoed
        self.one_call = one_call
        self.reasoning_parser = reasoning_parser
        self.include_reasoning = include_reasoning
        self.reasoning = ""
        self.thought = False  # whether the answer held one
        self.content = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def add(self, delta: ChoiceDelta) -> tuple[str, str, list[ToolCallDelta]]:
        """What `delta` adds: reasoning, text, and pieces of tool calls."""
        thought, text = "", delta.text
        if self.reasoning_parser is not None:
            split = self.reasoning_parser.feed(text)
            if delta.finish_reason is not None:
                rest = self.reasoning_parser.finish()
                split.reasoning += rest.reasoning
                split.content += rest.content
            self.thought = self.thought or bool(split.reasoning)
            thought, text = split.reasoning if self.include_reasoning else "", split.content
        self.reasoning += thought
        if self.parser is None:
            calls = []
        else:
            parsed = self.parser.feed(text)
            if delta.finish_reason is not None:
                rest = self.parser.finish()
                parsed.content += rest.content
                parsed.tool_calls += rest.tool_calls
            text, calls = parsed.content, parsed.tool_calls
            if self.one_call:
                calls = [call for call in calls if call.index == 0]
        self.content += text
        if delta.finish_reason is not None:
            called = self.parser is not None and self.parser.calls and delta.finish_reason == "stop"
            self.finish_reason = "tool_calls" if called else delta.finish_reason
            self.stop_reason = delta.stop_reason
        return thought, text, calls

    def message(self) -> ChatResponseMessage:
        calls = [ChatToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))
                 for call in (self.parser.calls if self.parser is not None else [])][:1 if self.one_call else None]
        # no text: null beside calls or a thought (even one include_reasoning leaves out), as vLLM answers
        content = self.content if self.content or not (calls or self.thought) else None
        if self.echoed:
            content = self.echoed + (content or "")
        return ChatResponseMessage(content=content, reasoning_content=self.reasoning or None,
                                   tool_calls=calls or None)
