"""A chat request's tools: the messages as its chat template takes them, and the grammar that forces a call.

A template that renders `tools` gets them and the history's calls and results as transformers passes
them. One that does not (SmolLM2's) still serves tools: the tools are described in the system message,
past calls are written into the assistant's text and results as `<tool_response>` user turns, all in
the Hermes format that sfllm/frontend/tool_call_parser.py reads. `tool_choice` `required` or a named
function is a grammar (a JSON schema per tool inside a Lark rule), so the call comes whatever the model. With
`auto` and a tool marked `strict` (OpenAI's: its arguments follow its schema), a structural tag, as SGLang builds
one: the answer is free, and a call, once the model opens one, names one of the tools and gives arguments of its
schema (any object for a tool not strict); with `parallel_tool_calls` false, the answer ends with its first call.
"""
from __future__ import annotations

import json
from typing import Any

from sfllm.frontend.errors import InvalidRequestError
from sfllm.frontend.openai_protocol import ChatCompletionRequest, ChatMessage
from sfllm.frontend.tool_protocol import ChatTool, NamedToolChoice
from sfllm.frontend.tool_call_parser import CLOSE_TAG, OPEN_TAG, Llama3JsonToolCallParser, ToolCallParser
from sfllm.sampling_params import StructuredOutput
from sfllm.structured_output import grammar_of, inline_json_schema, without_unlisted_properties

_ANY_ARGUMENTS = {"type": "object"}


class ChatTools:
    def __init__(self, body: ChatCompletionRequest) -> None:
        self.tools = body.tools or []
        choice = body.tool_choice or ("auto" if self.tools else "none")
        self.forced_name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        self.required = choice == "required" or self.forced_name is not None
        self.parallel = body.parallel_tool_calls is not False and self.forced_name is None
        if self.required and not self.tools:
            raise InvalidRequestError(f"tool_choice {_choice_text(choice)} needs tools", param="tool_choice")
        names = [tool.function.name for tool in self.tools]
        if self.forced_name is not None and self.forced_name not in names:
            raise InvalidRequestError(f"tool_choice names the function {self.forced_name!r}, which is not among "
                                      f"tools ({', '.join(names)})", param="tool_choice")
        own_constraint = body.requested_structured_output()
        # strict tools give way to the request's own constraint, which OpenAI's clients may send beside them
        self.strict = any(tool.function.strict for tool in self.tools) and own_constraint is None
        constraint = own_constraint if self.required else None
        if constraint is not None:
            raise InvalidRequestError(f"{constraint[0]} cannot be combined with tool_choice required or a named "
                                      "function: the tool call is the format", param=constraint[0])
        # with "none" the model is not told of the tools, and its text is never read as calls
        self.enabled = bool(self.tools) and choice != "none"

    def template_messages(self, messages: list[ChatMessage], template_takes_tools: bool) -> list[dict[str, Any]]:
        rendered = [_template_message(index, message, template_takes_tools) for index, message in enumerate(messages)]
        if self.enabled and not template_takes_tools:
            rendered = _with_tools_described(rendered, self.tools)
        return rendered

    def parser(self, template_format: str) -> ToolCallParser | Llama3JsonToolCallParser | None:
        """The reader of the model's calls: forced calls follow the grammar's format (Hermes) whatever the
        model's; free ones the format its template asks for."""
        if not self.enabled:
            return None
        if template_format == "llama3_json" and not self.required:
            return Llama3JsonToolCallParser()
        return ToolCallParser(forced=self.required)

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.for_template() for tool in self.tools] if self.enabled else None

    def structured_output(self, call_format: str) -> StructuredOutput | None:
        """The grammar of one call (of the named function), or of one or more (any tool), when forced; the
        structural tag of strict tools' calls in `call_format` (the parser's, llama3_json or Hermes) with `auto`."""
        if not self.required:
            return self._strict_calls(call_format) if self.enabled and self.strict else None
        tools = [t for t in self.tools if self.forced_name in (None, t.function.name)]
        bodies = [f"call_{index}: %json{inline_json_schema(_call_schema(tool))}" for index, tool in enumerate(tools)]
        calls = "call" if not self.parallel else 'call ("\\n" call)*'
        lark = "\n".join([f"start: {calls}", f"call: {json.dumps(OPEN_TAG + chr(10))} body "
                          f"{json.dumps(chr(10) + CLOSE_TAG)}",
                          "body: " + " | ".join(f"call_{index}" for index in range(len(tools))), *bodies])
        structured_output = StructuredOutput.grammar(lark)
        grammar_of(structured_output, param="tools")  # a bad parameters schema is the client's 400
        return structured_output

    def _strict_calls(self, call_format: str) -> StructuredOutput:
        if call_format == "llama3_json":  # Llama 3's bare JSON call
            trigger, begin, end = '{"name": ', '{{"name": {name}, "parameters": ', "}"
        else:  # Hermes, as forced calls are written
            trigger, begin, end = OPEN_TAG, OPEN_TAG + '\n{{"name": {name}, "arguments": ', "}\n" + CLOSE_TAG
        tags = [{"type": "tag", "begin": begin.format(name=json.dumps(tool.function.name)), "end": end,
                 "content": {"type": "json_schema", "json_schema": (tool.function.parameters or _ANY_ARGUMENTS)
                             if tool.function.strict else _ANY_ARGUMENTS}} for tool in self.tools]
        structured_output = StructuredOutput.structural_tag({"format": {
            "type": "triggered_tags", "triggers": [trigger], "tags": tags, "stop_after_first": not self.parallel}},
            "tools")
        grammar_of(structured_output, param="tools")  # a bad parameters schema is the client's 400
        return structured_output


def _choice_text(choice: Any) -> str:
    return f"naming {choice.function.name!r}" if isinstance(choice, NamedToolChoice) else repr(choice)


def _call_schema(tool: ChatTool) -> dict[str, Any]:
    arguments = without_unlisted_properties(tool.function.parameters or _ANY_ARGUMENTS)  # as response_format's
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _arguments(message_index: int, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"messages[{message_index}]: a tool call's arguments are not JSON: {error}",
                                  param=f"messages[{message_index}]") from None


def _template_message(index: int, message: ChatMessage, template_takes_tools: bool) -> dict[str, Any]:
    """The message as chat templates expect it; OpenAI's `developer` is a system message."""
    role = "system" if message.role == "developer" else message.role
    content = message.text()
    calls = [{"name": call.function.name, "arguments": _arguments(index, call.function.arguments)}
             for call in message.tool_calls or []]
    # Qwen3's template keeps the reasoning of the answers after the last user message (a chain of tool calls)
    reasoning = {} if message.reasoning_content is None else {"reasoning_content": message.reasoning_content}
    if template_takes_tools:
        rendered: dict[str, Any] = {"role": role, "content": content, **reasoning}
        if calls:
            rendered["tool_calls"] = [{"id": call.id, "type": "function", "function": function}
                                      for call, function in zip(message.tool_calls, calls)]
        if message.tool_call_id is not None:
            rendered["tool_call_id"] = message.tool_call_id
        return rendered
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
    written = [f"{OPEN_TAG}\n{json.dumps(call, ensure_ascii=False)}\n{CLOSE_TAG}" for call in calls]
    return {"role": role, "content": "\n".join(([content] if content else []) + written), **reasoning}


def _with_tools_described(messages: list[dict[str, Any]], tools: list[ChatTool]) -> list[dict[str, Any]]:
    described = "\n".join(json.dumps(tool.function.model_dump(exclude_none=True), ensure_ascii=False)
                          for tool in tools)
    instructions = ("You can call these functions:\n" + described + "\n\nTo call one, answer with " + OPEN_TAG +
                    '\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n' + CLOSE_TAG)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + instructions}] + messages[1:]
    return [{"role": "system", "content": instructions}] + messages
