"""OpenAI's Responses API request (`POST /v1/responses`), read as the chat request it amounts to.

The input's items become chat messages: `instructions` a system message first; messages as they are (their
`input_text`/`output_text` parts joined); `function_call` items the assistant's tool calls (a run of them one
message, joined to the assistant text before them); `function_call_output` items tool messages (each answers a
call before it, by call_id, as OpenAI requires); a `reasoning` item the next assistant message's
`reasoning_content`. Function tools, `tool_choice`, `text.format` and `reasoning.effort` become their chat
forms. Nothing is stored: `previous_response_id` and `background` are a 400, as is any tool but a
function (no server-side tools run here).
"""
from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field

from sfllm.frontend.errors import InvalidRequestError
from sfllm.frontend.openai_protocol import ChatCompletionRequest, ReasoningEffort, RequestPriority
from sfllm.frontend.request_checks import check_unicode_within
from sfllm.frontend.tool_protocol import StrictModel

# Chat fields read from a Responses request as they are; the request's other fields (vLLM's and sfllm's
# extensions: top_k, seed, stop, guided_json, ...) go to the chat request too, which reads or refuses them
_SHARED_FIELDS = ("model", "temperature", "top_p", "stream", "parallel_tool_calls", "priority", "user")
# Responses fields that change the answer and that this server does not implement
_UNSUPPORTED = ("conversation", "prompt", "max_tool_calls")
# chat fields a Responses request must not send: its own fields say these (max_output_tokens, ...), or the
# response could not carry them (logprobs)
_CHAT_ONLY = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
              "max_new_tokens": "max_output_tokens", "logprobs": None, "response_format": "text.format",
              "reasoning_effort": "reasoning.effort"}
# the Responses API's own stream_options (include_obfuscation) mean nothing to chat: not passed on
_NOT_PASSED_ON = ("stream_options", *_CHAT_ONLY)


class ResponsesRequest(StrictModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool | None = False
    store: bool | None = None  # accepted, but nothing is kept: a response cannot be read back
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    truncation: str | None = None
    user: str | None = None
    priority: RequestPriority | None = None

    def check_supported(self) -> None:
        for name in _UNSUPPORTED:
            if (self.model_extra or {}).get(name) is not None:
                raise InvalidRequestError(f"{name} is not supported by this server", param=name)
        # echoed in the response: text no encoder takes is the client's mistake, not a 500
        for name in ("metadata", "user", "text", "reasoning"):
            check_unicode_within(getattr(self, name), name)
        if self.previous_response_id is not None:
            raise InvalidRequestError("previous_response_id is not supported: this server stores no response; send "
                                      "the whole conversation in input", param="previous_response_id")
        if self.background:
            raise InvalidRequestError("background responses are not supported", param="background")
        if self.top_logprobs or any("logprobs" in item for item in self.include or []):
            raise InvalidRequestError("logprobs are not supported on /v1/responses; use /v1/chat/completions",
                                      param="top_logprobs" if self.top_logprobs else "include")
        effort = (self.reasoning or {}).get("effort")
        if effort is not None and effort not in get_args(ReasoningEffort):
            raise InvalidRequestError(f"reasoning.effort must be one of {', '.join(get_args(ReasoningEffort))}; got "
                                      f"{effort!r}", param="reasoning.effort")
        if self.truncation not in (None, "disabled"):
            raise InvalidRequestError("truncation \"auto\" is not supported: a prompt past the context is a 400",
                                      param="truncation")

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request this one amounts to; raises InvalidRequestError naming the Responses field."""
        self.check_supported()
        extra = self.model_extra or {}
        if extra.get("n") not in (None, 1):
            raise InvalidRequestError("n must be 1: a response has one answer", param="n")
        for name, instead in _CHAT_ONLY.items():
            if extra.get(name) not in (None, False):
                use = f"; use {instead}" if instead else ""
                raise InvalidRequestError(f"{name} is a chat field, not one of /v1/responses{use}", param=name)
        body: dict[str, Any] = {name: value for name, value in extra.items() if name not in _NOT_PASSED_ON}
        body |= {name: getattr(self, name) for name in _SHARED_FIELDS if getattr(self, name) is not None}
        body["messages"] = ([{"role": "system", "content": self.instructions}] if self.instructions else []) + \
            _messages(self.input)
        if self.max_output_tokens is not None:
            body["max_completion_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [_chat_tool(index, tool) for index, tool in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        text_format = (self.text or {}).get("format")
        if text_format is not None:
            body["response_format"] = _response_format(text_format)
        if (self.reasoning or {}).get("effort") is not None:
            body["reasoning_effort"] = self.reasoning["effort"]
        return ChatCompletionRequest.model_validate(body)


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    thought: str | None = None
    call_ids: set[str] = set()  # of the calls so far: an output answers one of them, as OpenAI requires
    for index, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            message = {"role": item.get("role"), "content": _text(index, item.get("content"))}
            if message["role"] == "assistant" and thought is not None:
                message["reasoning_content"] = thought
            thought = None  # a thought belongs to the assistant's turn right after it, or to none
            messages.append(message)
        elif kind == "function_call":
            call_id = _call_id(index, item)
            call_ids.add(call_id)
            call = {"id": call_id, "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and thought is None:
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                if thought is not None:
                    messages[-1]["reasoning_content"], thought = thought, None
        elif kind == "function_call_output":
            call_id = _call_id(index, item)
            if call_id not in call_ids:
                raise InvalidRequestError(f"input[{index}]: no function_call before this function_call_output has "
                                          f"call_id {call_id!r}", param=f"input[{index}].call_id")
            thought = None
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": output if isinstance(output, str) else _text(index, output)})
        elif kind == "reasoning":
            content, summary = item.get("content"), item.get("summary")
            parts, separator = (content, "") if content else (summary or [], "\n\n")
            thought = separator.join(part.get("text", "") for part in parts if isinstance(part, dict))
        else:
            raise InvalidRequestError(f"input[{index}]: items of type {kind!r} are not supported (message, "
                                      "function_call, function_call_output and reasoning are)",
                                      param=f"input[{index}].type")
    return messages


def _call_id(index: int, item: dict[str, Any]) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequestError(f"input[{index}]: a {item['type']} item needs its call_id",
                                  param=f"input[{index}].call_id")
    return call_id


def _text(index: int, content: Any) -> Any:
    """A message's content: a string, or its text parts joined as chat joins them."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise InvalidRequestError(f"input[{index}].content: parts of type {kind!r} are not supported: the models "
                                      "served here read text only (input_text)", param=f"input[{index}].content")
        texts.append({"type": "text", "text": part.get("text")})
    return texts


def _chat_tool(index: int, tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise InvalidRequestError(f"tools[{index}]: tools of type {tool.get('type')!r} are not supported (this "
                                  "server runs no tool; function tools are)", param=f"tools[{index}].type")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidRequestError("tool_choice is \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                                  "\"name\": ...}", param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(text_format: dict[str, Any]) -> dict[str, Any]:
    kind: Literal["text", "json_object", "json_schema"] | Any = text_format.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {key: text_format[key] for key in
                                                       ("name", "description", "schema", "strict")
                                                       if key in text_format}}
    raise InvalidRequestError(f"text.format of type {kind!r} is not supported (text, json_object, json_schema)",
                              param="text.format")
