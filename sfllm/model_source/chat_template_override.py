"""The operator's chat template in place of the model's (`--chat-template`, as vLLM's): a file's path, or the
template's text itself."""
from __future__ import annotations

from pathlib import Path

import msgspec

from sfllm.config import looks_like_template
from sfllm.frontend.chat_template import ChatTemplate
from sfllm.messages import TokenizerSpec


def with_chat_template(spec: TokenizerSpec, given: str | None) -> TokenizerSpec:
    """`spec` with the template `given` (None: the model's own); a ValueError for an unreadable file or a template
    that does not compile, before anything serves."""
    if given is None:
        return spec
    source, where = given, "given inline"
    if not looks_like_template(given):
        path = Path(given).expanduser()
        where = f"in {path}"
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read the chat template {path}: {error}") from None
    problem = ChatTemplate(source, spec.special_tokens).unusable
    if problem is not None:
        raise ValueError(f"the chat template {where} cannot serve: {problem}")
    return msgspec.structs.replace(spec, chat_template=source)
