"""The model's tokenizer as the frontend uses it: text to ids, ids to text, chat templates."""
from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from sfllm.model_source import ModelSource

_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ChatTemplateError(ValueError):
    """The chat template refused the messages, or the model has no template."""


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: how byte-level BPE spells bytes."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars)}


def _decoder_is_byte_level(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    return any(_decoder_is_byte_level(part) for part in decoder.get("decoders") or [])


class Tokenizer:
    """A Hugging Face tokenizer plus what the model says about it.

    `vocab_size` is the model's: ids in [0, vocab_size) are valid prompt tokens even
    where the tokenizer knows fewer (dummy models); such ids decode as empty text.
    """

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int],
                 vocab_size: int | None = None) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.num_known_tokens = len(hf_tokenizer)
        self.vocab_size = vocab_size if vocab_size is not None else self.num_known_tokens
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        decoder = json.loads(self._backend.to_str()).get("decoder") if self._backend is not None else None
        self._byte_level = _decoder_is_byte_level(decoder)
        self._added_tokens = {i: t.content for i, t in hf_tokenizer.added_tokens_decoder.items()}
        self.token_bytes = functools.lru_cache(maxsize=1 << 16)(self._token_bytes)
        # One thread: the Rust tokenizer releases the GIL while it encodes, so a long prompt does not stall
        # the event loop (and /health) behind it; one at a time keeps its shared state uncontended.
        self._encode_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    @classmethod
    def from_model_source(cls, source: ModelSource) -> Tokenizer:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_folder), local_files_only=True)
        return cls(hf_tokenizer, source.config.eos_token_ids, source.config.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of a raw prompt, with the special tokens the model expects around one."""
        return self.hf_tokenizer.encode(text, add_special_tokens=True)

    async def encode_async(self, text: str) -> list[int]:
        """`encode` off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_thread, self.encode, text)

    async def apply_chat_template_async(self, messages: list[dict[str, str]]) -> list[int]:
        """`apply_chat_template` off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_thread, self.apply_chat_template,
                                                                messages)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        try:
            prompt = self.hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"the chat template rejected the messages: {error}") from error
        except ValueError as error:
            raise ChatTemplateError(str(error)) from error
        # The template already wrote the special tokens (BOS and friends); adding them again would double them.
        return self.hf_tokenizer.encode(prompt, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of the ids, never "cleaned up": streamed text must equal the whole decode."""
        known = [t for t in token_ids if 0 <= t < self.num_known_tokens]
        if self._backend is not None:
            # The Rust tokenizer directly: a fifth of the cost of transformers' wrapper, on every token.
            return self._backend.decode(known, skip_special_tokens=skip_special_tokens)
        return self.hf_tokenizer.decode(known, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)

    def _token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for; a piece of a UTF-8 character stays a piece."""
        if not 0 <= token_id < self.num_known_tokens:
            return b""
        if token_id in self._added_tokens:
            return self._added_tokens[token_id].encode()
        token = self.hf_tokenizer.convert_ids_to_tokens(token_id)
        byte_fallback = _BYTE_FALLBACK_TOKEN.fullmatch(token)
        if byte_fallback:
            return bytes([int(byte_fallback.group(1), 16)])
        alphabet = _byte_level_alphabet()
        if self._byte_level and all(char in alphabet for char in token):
            return bytes(alphabet[char] for char in token)
        return token.replace("▁", " ").encode()

    def token_text(self, token_id: int) -> str:
        """How one token reads on its own, as OpenAI's logprobs show it: stray bytes as \\xNN."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")
