"""Chat templates rendered as transformers' `apply_chat_template` renders them, without transformers.

Hugging Face templates are Jinja written for one environment: sandboxed, `trim_blocks` and
`lstrip_blocks`, loop controls, a `tojson` that keeps non-ASCII text and takes json.dumps'
options, the globals `raise_exception` and `strftime_now`, and the `{% generation %}` tag
(which only marks the assistant's part). The variables are the messages, `tools`,
`documents`, `add_generation_prompt` and the named special tokens (`bos_token`, ...), plus any a request
names (`chat_template_kwargs`, e.g. Qwen3's `enable_thinking`).
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template refused the messages, or the model has no template; `param` names the request's field
    at fault."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks what the assistant wrote; rendering keeps the text."""
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


# What a template can raise on messages it does not expect: a bad request, not a bug of the server.
_RENDER_ERRORS = (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError)


class ChatTemplate:
    """One model's template, compiled once; `render` is safe to call from several threads."""

    def __init__(self, source: str | None, special_tokens: dict[str, str]) -> None:
        self._special_tokens = dict(special_tokens)
        self._template: jinja2.Template | None = None
        self.takes_tools = False  # whether the template reads the variable `tools`
        self.tool_call_format = "hermes"  # how the model writes calls: sfllm/frontend/tool_call_parser.py
        # A template that cannot serve chats leaves the rest of the API working; each chat request says why.
        self._unusable = "this model has no chat template; use /v1/completions with a prompt"
        if source is not None:
            try:
                environment = _environment()
                self._template = environment.from_string(source)
                self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(environment.parse(source))
                # Llama 3.1-3.3's templates ask for bare JSON calls ("parameters", after <|python_tag|>)
                if self.takes_tools and ("<|python_tag|>" in source or '"parameters": dictionary' in source):
                    self.tool_call_format = "llama3_json"
            except jinja2.TemplateSyntaxError as error:
                self._unusable = f"the chat template does not compile: {error}"

    @property
    def unusable(self) -> str | None:
        """Why no chat can be rendered (no template, or one that does not compile); None where chats can."""
        return None if self._template is not None else self._unusable

    def reserved_variables(self) -> set[str]:
        """The variables `render` sets itself, which a request's own variables may not replace."""
        return {"messages", "tools", "documents", "add_generation_prompt", *self._special_tokens}

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
               variables: dict[str, Any] | None = None, documents: list[dict[str, str]] | None = None) -> str:
        """The conversation as the model's prompt. `continue_final_message`: the text ends where the last
        message's content does (no end of turn after it), so the model writes on in that message, as
        transformers' option of that name. `variables`: more for the template, none of `reserved_variables`.
        `documents`: a retrieval template's sources (transformers' and vLLM's), each a dict such as `{"title",
        "text"}`; a template that names none ignores them."""
        if self._template is None:
            raise ChatTemplateError(self._unusable)
        if not messages:
            raise ChatTemplateError("messages is empty; it must hold at least one message")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true: the "
                                    "first continues the last message, the second opens a new one",
                                    param="continue_final_message")
        clashing = sorted(self.reserved_variables() & set(variables or {}))
        if clashing:
            raise ChatTemplateError(f"chat_template_kwargs may not set {', '.join(clashing)}: they come from the "
                                    "request itself (its messages, its tools; LLM.chat's tools=)",
                                    param="chat_template_kwargs")
        try:
            text = self._template.render(**(variables or {}), messages=messages, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **self._special_tokens)
        except _RENDER_ERRORS as error:
            raise ChatTemplateError(f"the chat template rejected the messages: {error}") from error
        return _cut_after_final_message(text, messages[-1]) if continue_final_message else text


def _cut_after_final_message(text: str, message: dict[str, Any]) -> str:
    """`text` up to the end of the last place the message's content appears in it. A template may strip the
    content: then up to the end of its stripped form."""
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ChatTemplateError("continue_final_message needs a last message with text to continue")
    stripped = content.strip()
    start = text.rfind(stripped)
    if start < 0:
        raise ChatTemplateError("continue_final_message: the chat template does not write the last message's "
                                "text as it is, so it cannot be continued")
    kept = content.lstrip()  # its trailing whitespace too, where the template kept it
    end = start + (len(kept) if text.startswith(kept, start) else len(stripped))
    return text[:end]
