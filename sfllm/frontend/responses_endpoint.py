"""`POST /v1/responses`: OpenAI's Responses API over the chat endpoint's generation.

The answer's output items come in the order the model writes them: a `reasoning` item (with a reasoning parser),
a `message` with one `output_text` part, then a `function_call` item per tool call. Streamed, each item is opened
(`response.output_item.added`), filled (`...delta` events) and closed (`...done`, `response.output_item.done`)
before the next opens, between `response.created`/`response.in_progress` and `response.completed` (or
`response.incomplete` where `max_output_tokens` cut the answer); every event carries its `sequence_number`.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from sfllm.frontend.chat_completions import AssistantMessage, ChatCompletionEndpoint
from sfllm.frontend.choice_generation import UsageTally
from sfllm.frontend.choices import ChoiceDelta
from sfllm.frontend.engine_client import EngineRequestError
from sfllm.frontend.errors import APIError, InvalidRequestError, api_error_from
from sfllm.frontend.http_responses import EventStreamResponse, start_event_stream, until_disconnect
from sfllm.frontend.metrics import RequestOutcome
from sfllm.frontend.responses_protocol import ResponsesRequest
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.sampling_params import InvalidSamplingParams, SamplingParams


# what a generation raises that names a request field (a client gone away, or a bug, is left to the app's handlers)
_GENERATION_ERRORS = (EngineRequestError, APIError)


class ResponsesEndpoint:
    def __init__(self, chat: ChatCompletionEndpoint) -> None:
        self.chat = chat

    async def __call__(self, body: ResponsesRequest, request: Request) -> JSONResponse | EventStreamResponse:
        try:
            chat_body = body.chat_request()
        except ValidationError as error:
            first = error.errors()[0]
            location = tuple(first.get("loc", ()))
            param = _responses_field(str(location[0])) if location else None
            if location == ("messages",) and first.get("type") == "too_short":
                raise InvalidRequestError("input holds no message to answer, only items of other types (such as "
                                          "reasoning)", param=param) from None
            where = _responses_field(".".join(str(part) for part in location))
            if location[:1] == ("messages",) and len(location) > 2:  # a message's index is not its input item's
                where = f"input, a message's {'.'.join(str(part) for part in location[2:])}"
            raise InvalidRequestError(f"invalid value at {where}: {first.get('msg', 'invalid value')}",
                                      param=param) from None
        try:
            generation = await self.chat.start(chat_body, request, "resp_")
        except (InvalidSamplingParams, APIError) as error:  # named by the chat field it became
            raise _as_responses_error(api_error_from(error)) from None
        answer = _Answer(generation.request_id, body, generation.messages[0], generation.tally, self.chat,
                         generation.params, streaming=bool(body.stream))
        if body.stream:
            events = self._events(generation.deltas, answer, generation.outcome)
            return await start_event_stream(request, events, generation.high_priority_trace)
        try:
            await until_disconnect(request, self._complete(generation.deltas, answer))
        except _GENERATION_ERRORS as error:  # named by the chat field it became
            raise _as_responses_error(api_error_from(error)) from None
        return JSONResponse(answer.response("completed"))

    @staticmethod
    async def _complete(deltas: AsyncGenerator[ChoiceDelta, None], answer: _Answer) -> None:
        async with aclosing(deltas):
            async for delta in deltas:
                answer.add(delta)
        answer.close_item(last=True)

    @staticmethod
    async def _events(deltas: AsyncGenerator[ChoiceDelta, None], answer: _Answer,
                      outcome: RequestOutcome) -> AsyncGenerator[str, None]:
        async with aclosing(deltas):
            try:
                first = await anext(deltas)
            except _GENERATION_ERRORS as error:  # the response's status, not an event
                raise _as_responses_error(api_error_from(error)) from None
            yield answer.event("response.created", response=answer.response("in_progress"))
            yield answer.event("response.in_progress", response=answer.response("in_progress"))
            for event in answer.add(first):
                yield event
            try:
                async for delta in deltas:
                    for event in answer.add(delta):
                        yield event
            except Exception as error:  # the status line is gone: an error event, as OpenAI streams it
                api_error = _as_responses_error(api_error_from(error))
                outcome.stream_error_status, outcome.stream_error_code = api_error.status_code, api_error.code
                yield answer.event("error", code=api_error.code or api_error.error_type, message=api_error.message,
                                   param=api_error.param)
                return
        for event in answer.close_item(last=True):
            yield event
        status = answer.status()
        yield answer.event(f"response.{status}", response=answer.response(status))


class _Answer:
    """The response's output items as the deltas build them, and the events that tell each step."""

    def __init__(self, request_id: str, body: ResponsesRequest, message: AssistantMessage, tally: UsageTally,
                 chat: ChatCompletionEndpoint, params: SamplingParams, streaming: bool) -> None:
        self.id = request_id
        self.streaming = streaming  # whole answers build the same items and write no event
        self.body = body
        self.params = params  # echoed as vLLM echoes them: what ran, the model's defaults included
        self.message = message
        self.tally = tally
        self.tokenizer: Tokenizer = chat.tokenizer
        self.model = chat.served_model_name
        self.created_at = int(time.time())
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being written
        self.calls: dict[int, dict[str, Any]] = {}  # function_call items by the tool call's index
        self.sequence_number = 0

    def event(self, kind: str, **fields: Any) -> str:
        if not self.streaming:
            return ""
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        # an error's message may quote the client's text, unpaired surrogates and all: ASCII JSON carries it
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=kind == 'error')}\n\n"

    def add(self, delta: ChoiceDelta) -> list[str]:
        self.tally.record(delta)
        thought, text, calls = self.message.add(delta)
        events = []
        if thought:
            events += self._write("reasoning", thought)
        if text:
            events += self._write("message", text)
        for call in calls:
            events += self._call(call.index, call.id, call.name, call.arguments)
        return events

    def _write(self, kind: str, text: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self.close_item()
            events += self._open(kind)
        item, index = self.open, len(self.output) - 1
        part = item["content"][0]
        part["text"] += text
        delta_kind = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        events.append(self.event(delta_kind, item_id=item["id"], output_index=index, content_index=0, delta=text,
                                 **extra))
        return events

    def _open(self, kind: str) -> list[str]:
        if kind == "reasoning":
            item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [], "status": "in_progress",
                    "content": [{"type": "reasoning_text", "text": ""}]}
            added = {**item, "content": []}
        else:
            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "in_progress", "role": "assistant",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            added = {**item, "content": []}
        self.output.append(item)
        self.open = item
        index = len(self.output) - 1
        events = [self.event("response.output_item.added", output_index=index, item=added)]
        part = {"type": "output_text", "text": "", "annotations": []} if kind == "message" else \
            {"type": "reasoning_text", "text": ""}
        events.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                 content_index=0, part=part))
        return events

    def _call(self, call_index: int, call_id: str | None, name: str | None, arguments: str | None) -> list[str]:
        events = []
        item = self.calls.get(call_index)
        if item is None:
            events += self.close_item()
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name or "",
                    "arguments": "", "status": "in_progress"}
            self.calls[call_index] = item
            self.output.append(item)
            self.open = item
            events.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=item))
        elif name:
            item["name"] += name
        if arguments:
            item["arguments"] += arguments
            events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                     output_index=self.output.index(item), delta=arguments))
        return events

    def close_item(self, last: bool = False) -> list[str]:
        """Closes the item being written: its done events. The answer's last item is incomplete where
        max_output_tokens cut the answer."""
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = "incomplete" if last and self.status() == "incomplete" and _cut(item) else "completed"
        index = self.output.index(item)
        events = []
        if item["type"] == "reasoning":
            part = item["content"][0]
            events.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=part["text"]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
        elif item["type"] == "message":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=part["text"], logprobs=[]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=index, name=item["name"], arguments=item["arguments"]))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events

    def status(self) -> str:
        return "incomplete" if self.message.finish_reason == "length" else "completed"

    def response(self, status: str) -> dict[str, Any]:
        """The response object; `status` in_progress leaves out what is not known yet."""
        done = status != "in_progress"
        if done:
            status = self.status()
        usage = None
        if done:
            counts = self.tally.usage()
            reasoning = sum(len(self.tokenizer.encode_text(item["content"][0]["text"]))
                            for item in self.output if item["type"] == "reasoning")
            usage = {"input_tokens": counts.prompt_tokens, "output_tokens": counts.completion_tokens,
                     "total_tokens": counts.total_tokens,
                     # cache_write_tokens: OpenAI's prompt-caching charge, none here (the SDK's type requires it)
                     "input_tokens_details": {"cached_tokens": counts.prompt_tokens_details.cached_tokens,
                                              "cache_write_tokens": 0},
                     "output_tokens_details": {"reasoning_tokens": min(reasoning, counts.completion_tokens)}}
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "model": self.model,
            "status": status, "output": self.output if done else [], "usage": usage, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": self.params.max_tokens,
            "temperature": self.params.temperature, "top_p": self.params.top_p, "tools": body.tools or [],
            "tool_choice": body.tool_choice or "auto", "parallel_tool_calls": body.parallel_tool_calls is not False,
            "text": body.text or {"format": {"type": "text"}}, "reasoning": body.reasoning,
            "metadata": body.metadata or {}, "previous_response_id": None, "store": False, "truncation": "disabled",
            "user": body.user,
        }


# the chat fields a Responses request's fields became, by the name the client used
_RESPONSES_FIELDS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                     "response_format": "text.format", "reasoning_effort": "reasoning.effort"}


def _responses_field(param: str) -> str:
    for chat_name, name in _RESPONSES_FIELDS.items():
        if param == chat_name or param.startswith((chat_name + ".", chat_name + "[")):
            # a message's index is not its input item's (instructions, calls joined): the field alone
            return name if chat_name == "messages" else name + param[len(chat_name):]
    return param


def _as_responses_error(error: APIError) -> APIError:
    """The error named by the Responses fields (max_output_tokens, not the max_completion_tokens it became)."""
    message = error.message
    for chat_name, name in _RESPONSES_FIELDS.items():  # a message that opens or ends with the field's name
        if chat_name != "messages" and message.startswith(chat_name):
            message = name + message[len(chat_name):]
        if chat_name != "messages" and message.endswith(f" {chat_name}."):
            message = message[:-len(chat_name) - 1] + name + "."
    param = None if error.param is None else _responses_field(error.param)
    return APIError(error.status_code, message, error_type=error.error_type, param=param, code=error.code,
                    headers=error.headers)


def _cut(item: dict[str, Any]) -> bool:
    """Whether max_output_tokens cut this item: text always may be; a call only if its arguments are not whole."""
    if item["type"] != "function_call":
        return True
    try:
        json.loads(item["arguments"])
    except json.JSONDecodeError:
        return True
    return False
