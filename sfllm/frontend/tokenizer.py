"""The model's tokenizer as the frontend uses it: text to ids, ids to text, chat templates.

Built from the engine's TokenizerSpec with `tokenizers` and jinja2 alone: the frontend
process never imports transformers or torch, so it starts in about a second.
"""
from __future__ import annotations

import asyncio
import codecs
import functools
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import tokenizers

from sfllm.byte_level_alphabet import character_bytes
from sfllm.frontend.chat_template import ChatTemplate
from sfllm.messages import TokenizerSpec

_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_is_byte_level(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_decoder_is_byte_level(part) for part in decoder.get("decoders") or [])


def _cut_character_length(data: bytes) -> int:
    """How many bytes at the end of `data` begin a UTF-8 character that they do not finish."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data, final=False)
    return len(decoder.getstate()[0])


class Tokenizer:
    """The `tokenizers` backend, the chat template and the model's vocabulary size.

    `vocab_size` is the model's: ids in [0, vocab_size) are valid prompt tokens even
    where the tokenizer knows fewer (dummy models); such ids decode as empty text.
    """

    def __init__(self, spec: TokenizerSpec) -> None:
        self._backend = tokenizers.Tokenizer.from_str(spec.tokenizer_json)
        self.chat_template = ChatTemplate(spec.chat_template, spec.special_tokens)
        self.num_known_tokens = self._backend.get_vocab_size(with_added_tokens=True)
        self.vocab_size = spec.vocab_size
        self._byte_level = _decoder_is_byte_level(json.loads(spec.tokenizer_json).get("decoder"))
        added = self._backend.get_added_tokens_decoder()
        self._added_tokens = {token_id: token.content for token_id, token in added.items()}
        self._special_ids = frozenset(token_id for token_id, token in added.items() if token.special)
        self.token_bytes = functools.lru_cache(maxsize=1 << 16)(self._token_bytes)
        # One thread: the Rust tokenizer releases the GIL while it encodes, so a long prompt does not stall
        # the event loop (and /health) behind it; one at a time keeps its shared state uncontended.
        self._encode_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a raw prompt, with the special tokens the model expects around one (unless told not)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a piece of text, without the special tokens of a prompt (a bad word's, a stop word's)."""
        return self.encode(text, add_special_tokens=False)

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`encode` off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_thread, self.encode, text,
                                                                add_special_tokens)

    async def apply_chat_template_async(self, messages: list[dict[str, Any]],
                                        tools: list[dict[str, Any]] | None = None, add_generation_prompt: bool = True,
                                        continue_final_message: bool = False,
                                        variables: dict[str, Any] | None = None,
                                        add_special_tokens: bool = False,
                                        documents: list[dict[str, str]] | None = None) -> list[int]:
        """`apply_chat_template` off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            self._encode_thread, functools.partial(self.apply_chat_template, messages, add_generation_prompt, tools,
                                                   continue_final_message, variables, add_special_tokens, documents))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
                            variables: dict[str, Any] | None = None, add_special_tokens: bool = False,
                            documents: list[dict[str, str]] | None = None) -> list[int]:
        """Token ids of the rendered conversation (ChatTemplate.render's options); raises ChatTemplateError if
        the template refuses it. The template writes the special tokens (BOS and friends) itself: only
        `add_special_tokens` (vLLM's chat option) adds the tokenizer's again."""
        prompt = self.chat_template.render(messages, add_generation_prompt, tools, continue_final_message, variables,
                                           documents)
        return self._backend.encode(prompt, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of the ids, never "cleaned up": streamed text must equal the whole decode."""
        known = [t for t in token_ids if 0 <= t < self.num_known_tokens]
        return self._backend.decode(known, skip_special_tokens=skip_special_tokens)

    def without_cut_character(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> tuple[list[int], str]:
        """The ids without the first bytes of a character that they end in (generation stopped inside it).

        Returns the ids whose text holds whole characters only, and the whole characters of
        the dropped token the cut one starts in (a byte-level token may hold " " and a first byte)."""
        ids = list(token_ids)
        while ids and skip_special_tokens and ids[-1] in self._special_ids:
            ids.pop()  # shows no text
        cut = _cut_character_length(b"".join(self.token_bytes(t) for t in ids))
        if not cut:
            return list(token_ids), ""
        while True:
            token = self.token_bytes(ids.pop())
            if len(token) >= cut:
                return ids, token[:len(token) - cut].decode("utf-8", errors="replace")
            cut -= len(token)

    def _token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for; a piece of a UTF-8 character stays a piece."""
        if not 0 <= token_id < self.num_known_tokens:
            return b""
        if token_id in self._added_tokens:
            return self._added_tokens[token_id].encode()
        token = self._backend.id_to_token(token_id)
        byte_fallback = _BYTE_FALLBACK_TOKEN.fullmatch(token)
        if byte_fallback:
            return bytes([int(byte_fallback.group(1), 16)])
        alphabet = character_bytes()
        if self._byte_level and all(char in alphabet for char in token):
            return bytes(alphabet[char] for char in token)
        return token.replace("▁", " ").encode()

    def vocabulary_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token as the vocabulary spells it ("Ġthe", "<|im_end|>"), as transformers' convert_ids_to_tokens;
        "" for an id the tokenizer does not know."""
        return [(self._backend.id_to_token(t) or "") if 0 <= t < self.num_known_tokens else "" for t in token_ids]

    def token_text(self, token_id: int) -> str:
        """How one token reads on its own, as OpenAI's logprobs show it: stray bytes as \\xNN."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def token_decoded(self, token_id: int) -> str:
        """How one token reads on its own, as vLLM's `decoded_token` shows it: a character it does not complete as
        U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")
