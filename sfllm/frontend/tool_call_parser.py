"""Tool calls out of a model's text, as it streams: the Hermes format that Qwen 2.5/3 and Hermes models
write, and that sfllm's tool-call grammars force (sfllm/frontend/tools.py):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text outside the tags is the message's content. Llama 3.1-3.3 answer a call with JSON alone instead (after
`<|python_tag|>` when the text keeps special tokens), calls separated by `;`:

    {"name": "get_weather", "parameters": {"city": "Paris"}}

`Llama3JsonToolCallParser` reads that: an answer that starts with `{` is calls, any other is content.

In both, a call's name goes out as soon as it is read and its arguments as they are written, character by
character of the JSON value, so the deltas of a stream join into the very string the whole answer has: both
come from one parser.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from sfllm.frontend.stream_tags import partial_tag_length

# the formats read here, by vLLM's names for its parsers of them (Qwen's and Hermes' tags, Llama 3.1-3.3's JSON)
TOOL_CALL_FORMATS = ("hermes", "llama3_json")

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
# name first, then arguments: the order the format and the grammars write
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_LLAMA3_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:parameters|arguments)"\s*:\s*')
PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCallDelta:
    """What a piece of text added to call `index`: its id and name come once, first."""
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class ParsedText:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class _ArgumentsScanner:
    """Where a JSON value ends, one character at a time: strings, escapes and nesting."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False
        self.done = False

    def take(self, char: str) -> bool:
        """Whether `char` belongs to the value (False: the value ended before it, or it is leading space)."""
        if self.in_string:
            self.escaped, self.in_string = (False, True) if self.escaped else (char == "\\", char != '"')
            return True
        if not self.started and char.isspace():
            return False
        if self.depth == 0 and self.started and char in ",}":
            self.done = True  # a scalar value ends at the outer object's next separator
            return False
        self.started = True
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            self.done = self.depth == 0
        return True


class ToolCallParser:
    def __init__(self, forced: bool = False) -> None:
        self.forced = forced  # a grammar makes the answer calls (tool_choice required or named): none of it is text
        self.calls: list[ToolCall] = []
        self._buffer = ""  # text not yet given out: a possible start of a tag, trailing space, a call's head
        self._in_call = False
        self._scanner: _ArgumentsScanner | None = None  # reading a call's arguments

    def feed(self, text: str) -> ParsedText:
        parsed = ParsedText()
        self._buffer += text
        while self._buffer:
            before = self._buffer
            if not self._in_call:
                self._read_content(parsed)
            elif self._scanner is None:
                self._read_head(parsed)
            else:
                self._read_arguments(parsed)
            if self._buffer == before:
                break  # waiting for more text
        return parsed

    def finish(self) -> ParsedText:
        """The end of the output: what was held back. An unfinished call keeps what it has; after other calls, a
        call cut before its name (the next call, cut by max_tokens) is dropped: no text of the answer; so is one
        cut before its name, or inside its opening tag, where a grammar forced the calls."""
        parsed = ParsedText()
        if not self._in_call:
            cut_tag = self.forced and OPEN_TAG.startswith(self._buffer.strip())
            if not (cut_tag or (self.calls and self._buffer.isspace())):
                parsed.content = self._buffer
        elif self._scanner is None:
            cut_call = ((self.calls or self.forced)
                        and (not self._buffer.strip() or self._buffer.lstrip().startswith("{")))
            if not cut_call:
                parsed.content = OPEN_TAG + self._buffer  # never became a call
        self._buffer = ""
        return parsed

    def _read_content(self, parsed: ParsedText) -> None:
        start = self._buffer.find(OPEN_TAG)
        if start >= 0:
            content = self._buffer[:start]
            # the space between text and a call is no part of either
            parsed.content += content.rstrip() if content.strip() else ""
            self._buffer = self._buffer[start + len(OPEN_TAG):]
            self._in_call = True
            return
        keep = _held_back(self._buffer)
        parsed.content += self._buffer[:len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep:]

    def _read_head(self, parsed: ParsedText) -> None:
        head = _HEAD.match(self._buffer)
        if head is not None:
            self._start_call(parsed, json.loads(f'"{head.group(1)}"'))
            self._buffer = self._buffer[head.end():]
            self._scanner = _ArgumentsScanner()
            return
        end = self._buffer.find(CLOSE_TAG)
        if end < 0:
            return
        # not in the streaming order (arguments first, say): the whole call at once, if it is one
        body, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE_TAG):]
        self._in_call = False
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", call.get("parameters", {}))
        except (ValueError, KeyError, TypeError):
            parsed.content += OPEN_TAG + body + CLOSE_TAG
            return
        delta = self._start_call(parsed, str(name))
        delta.arguments = json.dumps(arguments, ensure_ascii=False)
        self.calls[-1].arguments = delta.arguments

    def _read_arguments(self, parsed: ParsedText) -> None:
        scanner = self._scanner
        if not scanner.done:
            taken = _add_arguments(scanner, self._buffer, self.calls, parsed)
            self._buffer = self._buffer[taken:]
            if not scanner.done:
                return
        end = self._buffer.find(CLOSE_TAG)
        if end >= 0:
            self._buffer = self._buffer[end + len(CLOSE_TAG):]
            self._in_call = False
            self._scanner = None

    def _start_call(self, parsed: ParsedText, name: str) -> ToolCallDelta:
        call = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments="")
        self.calls.append(call)
        delta = ToolCallDelta(len(self.calls) - 1, id=call.id, name=name)
        parsed.tool_calls.append(delta)
        return delta


def _add_arguments(scanner: _ArgumentsScanner, text: str, calls: list[ToolCall], parsed: ParsedText) -> int:
    """Gives the part of `text` that continues the last call's arguments to that call and to `parsed`; returns
    how many characters of `text` it took (the leading space too, not the separator after the value)."""
    taken, value = 0, []
    for char in text:
        belongs = scanner.take(char)
        if scanner.done and not belongs:
            break  # the separator after the value: no part of it
        taken += 1
        if belongs:
            value.append(char)
        if scanner.done:
            break
    if value:
        parsed.tool_calls.append(ToolCallDelta(len(calls) - 1, arguments="".join(value)))
        calls[-1].arguments += "".join(value)
    return taken


def _held_back(text: str) -> int:
    """How many characters at the end of `text` to hold: a possible start of the tag, and trailing space
    (which belongs to no part if a call follows)."""
    length = partial_tag_length(text, OPEN_TAG)
    before = text[:len(text) - length]
    return length + len(before) - len(before.rstrip())


class Llama3JsonToolCallParser:
    """Llama 3's JSON tool calls, streamed as ToolCallParser streams Hermes calls (same deltas, same `calls`)."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._state = "start"  # start, head, arguments, close (the call's "}"), between (";" or the end), content
        self._scanner: _ArgumentsScanner | None = None
        self._skipped = ""  # the space and tag before the first "{": content again if no call follows

    def feed(self, text: str) -> ParsedText:
        parsed = ParsedText()
        self._buffer += text
        while self._buffer:
            before = (self._buffer, self._state)
            getattr(self, f"_read_{self._state}")(parsed)
            if (self._buffer, self._state) == before:
                break  # waiting for more text
        return parsed

    def finish(self) -> ParsedText:
        """The end of the output: text that never became a call is content; an unfinished call keeps what it has."""
        parsed = ParsedText()
        if self._state in ("start", "content") or (self._state == "head" and not self.calls):
            parsed.content = self._skipped + self._buffer
        self._buffer = ""
        return parsed

    def _read_start(self, parsed: ParsedText) -> None:
        text = self._buffer.lstrip()
        if text.startswith(PYTHON_TAG):
            text = text[len(PYTHON_TAG):].lstrip()
        if not text or (PYTHON_TAG.startswith(text) and not self._buffer.lstrip().startswith(PYTHON_TAG)):
            return  # nothing yet, or a possible start of the tag
        if text.startswith("{"):
            self._skipped = self._buffer[:len(self._buffer) - len(text)]
            self._buffer, self._state = text, "head"
        else:
            self._state = "content"

    def _read_content(self, parsed: ParsedText) -> None:
        parsed.content += self._buffer
        self._buffer = ""

    def _read_head(self, parsed: ParsedText) -> None:
        head = _LLAMA3_HEAD.match(self._buffer)
        if head is not None:
            call = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=json.loads(f'"{head.group(1)}"'), arguments="")
            self.calls.append(call)
            parsed.tool_calls.append(ToolCallDelta(len(self.calls) - 1, id=call.id, name=call.name))
            self._buffer, self._state, self._scanner = self._buffer[head.end():], "arguments", _ArgumentsScanner()
            return
        if not self.calls and len(self._buffer) > 4096:
            # long JSON that names no function first: an answer, not a call
            self._buffer, self._skipped, self._state = self._skipped + self._buffer, "", "content"

    def _read_arguments(self, parsed: ParsedText) -> None:
        self._buffer = self._buffer[_add_arguments(self._scanner, self._buffer, self.calls, parsed):]
        if self._scanner.done:
            self._state = "close"

    def _read_close(self, parsed: ParsedText) -> None:
        end = self._buffer.find("}")
        if end >= 0:
            self._buffer, self._state = self._buffer[end + 1:], "between"

    def _read_between(self, parsed: ParsedText) -> None:
        text = self._buffer.lstrip().lstrip(";").lstrip()
        if not text:
            return
        self._buffer, self._state = text, ("head" if text.startswith("{") else "content")
