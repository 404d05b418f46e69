"""The operator's chat template in place of the model's (`--chat-template`, as vLLM's): a file's path, or the
template's text itself."""
from __future__ import annotations

from pathlib import Path

import msgspec

from sfllm.frontend.chat_template import ChatTemplate
from sfllm.messages import TokenizerSpec


def looks_like_template(given: str) -> bool:
    """Whether `--chat-template` gave the template itself rather than a file's path."""
    return "{{" in given or "{%" in given


def chat_template_source(given: str) -> str:
    """The template `given` names (a file's path) or is; a ValueError saying why it cannot serve: an unreadable
    file, an empty template, one that does not compile."""
    source, where = given, "given inline"
    if not looks_like_template(given):
        path = Path(given).expanduser()
        where = f"in {path}"
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the chat template {path}: {error}") from None
    if not source.strip():
        raise ValueError(f"the chat template {where} is empty")
    problem = ChatTemplate(source, {}).unusable
    if problem is not None:
        raise ValueError(f"the chat template {where} cannot serve: {problem}")
    return source


def with_chat_template(spec: TokenizerSpec, given: str | None) -> TokenizerSpec:
    """`spec` with the template `given` (None: the model's own)."""
    if given is None:
        return spec
    return msgspec.structs.replace(spec, chat_template=chat_template_source(given))
