"""The frontend's tokenizer as plain data, made once by the engine, which may import transformers."""
from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from sfllm.messages import TokenizerSpec
from sfllm.model_source.resolve import ModelSource


class UnsupportedTokenizer(ValueError):
    pass


def tokenizer_spec(source: ModelSource) -> TokenizerSpec:
    """What transformers makes of the model's tokenizer files, for a process without transformers.

    The `tokenizers` backend is exported after transformers set it up (added tokens, the
    post-processor that adds BOS, a SentencePiece model converted), so encoding with it gives
    the ids transformers would."""
    hf_tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_folder), local_files_only=True)
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizer(f"transformers loads the tokenizer in {source.tokenizer_folder} as "
                                   f"{type(hf_tokenizer).__name__}, which has no `tokenizers` backend; add a "
                                   "tokenizer.json to the folder")
    backend.no_truncation()
    backend.no_padding()
    return TokenizerSpec(tokenizer_json=backend.to_str(), chat_template=_default_template(hf_tokenizer.chat_template),
                         special_tokens=dict(hf_tokenizer.special_tokens_map), vocab_size=source.config.vocab_size)


def _default_template(template: Any) -> str | None:
    """A model with several named templates chats with its "default" one, as in transformers."""
    return template.get("default") if isinstance(template, dict) else template
