"""A HuggingFace tokenizer folder rebuilt from the tokenizer a GGUF file carries."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from sfllm.model_source.gguf_metadata import GGUFMetadata

logger = logging.getLogger(__name__)

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


@dataclass(frozen=True)
class BytePairPreprocessing:
    """How the HF tokenizer that llama.cpp's `tokenizer.ggml.pre` name stands for splits text."""

    pre_tokenizer: Callable[[], pre_tokenizers.PreTokenizer]
    nfc: bool = False
    ignore_merges: bool = False


# The same splits llama.cpp's llama-vocab.cpp applies for each `tokenizer.ggml.pre`.
BYTE_PAIR_PREPROCESSING = {
    "gpt2": BytePairPreprocessing(lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    "smollm": BytePairPreprocessing(_digits_then_gpt2),
    "qwen2": BytePairPreprocessing(lambda: _split_then_bytes(QWEN2_SPLIT), nfc=True),
    "llama-bpe": BytePairPreprocessing(lambda: _split_then_bytes(LLAMA3_SPLIT), ignore_merges=True),
}


def save_gguf_tokenizer(metadata: GGUFMetadata, folder: Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json and the chat template into `folder`.

    Special tokens come from the GGUF ids, never from transformers' GGUF tokenizer, whose
    Llama converter reports the BOS token as EOS (SmolLM2: `<|im_start|>` instead of `<|im_end|>`).
    """
    tokens: list[str] = metadata.get("tokenizer.ggml.tokens")
    tokenizer_model = metadata.get("tokenizer.ggml.model")

    def token(key: str) -> str | None:
        token_id = metadata.get(key, None)
        return None if token_id is None else tokens[token_id]

    # transformers only where a folder is built: it is seconds of import for a worker that finds the folder cached
    from transformers import PreTrainedTokenizerFast
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(metadata, tokens),
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        # llama.cpp's defaults: SentencePiece ("llama") models start with BOS, byte-level BPE ones do not.
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", tokenizer_model == "llama")),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        model_max_length=metadata.get_model("context_length"),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = metadata.get("tokenizer.chat_template", None)
    tokenizer.save_pretrained(folder)


def _backend_tokenizer(metadata: GGUFMetadata, tokens: list[str]) -> Tokenizer:
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if tokenizer_model == "gpt2" and pre in BYTE_PAIR_PREPROCESSING:
        return _byte_pair_tokenizer(metadata, tokens, BYTE_PAIR_PREPROCESSING[pre])
    if tokenizer_model == "gpt2":
        logger.warning(
            "GGUF %s: pre-tokenizer %r is not one of %s; using transformers' GGUF tokenizer, whose splitting "
            "of text may differ from the original model's",
            metadata.path.name, pre, ", ".join(BYTE_PAIR_PREPROCESSING),
        )
    # SentencePiece-style ("llama") vocabularies and unknown pre-tokenizers: transformers' converter.
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(metadata.path.parent, gguf_file=metadata.path.name).backend_tokenizer


def _byte_pair_tokenizer(metadata: GGUFMetadata, tokens: list[str], preprocessing: BytePairPreprocessing) -> Tokenizer:
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges")]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=preprocessing.ignore_merges))
    if preprocessing.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = preprocessing.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    token_types = metadata.get("tokenizer.ggml.token_type")
    # llama.cpp marks HF's special added tokens CONTROL and its plain added tokens USER_DEFINED.
    tokenizer.add_tokens([
        AddedToken(tokens[token_id], special=token_type == TokenType.CONTROL, normalized=False)
        for token_id, token_type in enumerate(token_types)
        if token_type in (TokenType.CONTROL, TokenType.USER_DEFINED)
    ])
    return tokenizer
