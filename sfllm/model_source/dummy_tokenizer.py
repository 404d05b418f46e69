"""A byte-level tokenizer for models served with dummy weights, built offline."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from sfllm.byte_level_alphabet import byte_characters, character_bytes
from sfllm.model_source.atomic_folder import cached_folder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump when the saved tokenizer changes, so stale cached copies are not reused.
DUMMY_TOKENIZER_VERSION = 2
# In Qwen's order, at ids 256, 257, 258 right after the byte tokens.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def dummy_tokenizer_folder(cache_root: Path, vocab_size: int = 0) -> Path:
    """A transformers-loadable tokenizer folder under `cache_root`, built on first use.

    Every byte is one token (ids 0..255, no merges), followed by the ChatML special tokens
    (256..258). With `vocab_size`, ids 259 and up are filler words " w<id>", so that every
    token a dummy model samples decodes to text and streams as a chunk (benchmarks time
    those chunks); encoding never produces them. The model's EOS ids (151645, 151643 for
    the Qwen3 presets) are not this tokenizer's `<|im_end|>`.
    """
    target = cache_root / f"dummy-tokenizer-v{DUMMY_TOKENIZER_VERSION}-{vocab_size}"
    return cached_folder(target, lambda scratch: _byte_tokenizer(vocab_size).save_pretrained(scratch))


def _byte_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast  # only where the folder is built, as the GGUF tokenizer's
    vocab = dict(character_bytes())
    vocab.update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    space = byte_characters()[ord(" ")]
    vocab.update({f"{space}w{token_id}": token_id for token_id in range(len(vocab), vocab_size)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=40960
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer

