"""The frontend's tokenizer as plain data, made by the engine with transformers once per tokenizer and kept."""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from pathlib import Path
from typing import Any

import msgspec

from sfllm.messages import TokenizerSpec
from sfllm.model_source.resolve import ModelSource

# a model folder's files that are not its tokenizer's, left out of the kept spec's key (they can be gigabytes)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


class UnsupportedTokenizer(ValueError):
    pass


def tokenizer_spec(source: ModelSource, cache_dir: Path | None = None) -> TokenizerSpec:
    """What transformers makes of the model's tokenizer files, for a process without transformers.

    The `tokenizers` backend is exported after transformers set it up (added tokens, the
    post-processor that adds BOS, a SentencePiece model converted), so encoding with it gives
    the ids transformers would. With `cache_dir` the spec is kept there, under a digest of the
    folder's files, of transformers' and tokenizers' versions and of this module: a later start
    reads it back without importing transformers (3-4 s of a server's start on a 2-core machine)."""
    if cache_dir is None:
        return _made_by_transformers(source)
    path = cache_dir / "tokenizer-specs" / f"{_digest(source)}.msgpack"
    try:
        return msgspec.msgpack.decode(path.read_bytes(), type=TokenizerSpec)
    except (OSError, msgspec.DecodeError):  # not made yet, or unreadable: made again
        pass
    spec = _made_by_transformers(source)
    _write_atomically(path, msgspec.msgpack.encode(spec))
    return spec


def _made_by_transformers(source: ModelSource) -> TokenizerSpec:
    from transformers import AutoTokenizer  # seconds to import: only where no kept spec serves

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


def transformers_tokenizer(spec: TokenizerSpec, eos_token_ids: tuple[int, ...], name: str,
                           max_length: int) -> Any:
    """The spec as transformers' tokenizer class (the offline API's `get_tokenizer()`): the same backend, chat
    template and special tokens, with the model's EOS where transformers read another (a GGUF's); `name` and
    `max_length` (the engine's context) as its name_or_path and model_max_length."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_str(spec.tokenizer_json)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=spec.chat_template,
                                        name_or_path=name, model_max_length=max_length, **spec.special_tokens)
    if eos_token_ids and tokenizer.eos_token_id not in eos_token_ids and backend.id_to_token(eos_token_ids[0]):
        tokenizer.eos_token = backend.id_to_token(eos_token_ids[0])
    return tokenizer


def _digest(source: ModelSource) -> str:
    """What the spec depends on: every file of the tokenizer's folder but weights (config.json included: transformers
    may pick the tokenizer's class by it), the model's vocabulary size, the libraries that make it, and this code."""
    digest = hashlib.sha256()
    for library in ("transformers", "tokenizers"):
        digest.update(f"{library}={importlib.metadata.version(library)}\n".encode())
    digest.update(f"vocab_size={source.config.vocab_size}\n".encode())
    digest.update(Path(__file__).read_bytes())
    for path in sorted(source.tokenizer_folder.iterdir()):
        if path.is_file() and path.suffix not in _WEIGHT_SUFFIXES:
            digest.update(f"\n{path.name}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]


def _write_atomically(path: Path, data: bytes) -> None:
    """Written whole or not at all (a rename), so a reader never sees half a spec; a cache that cannot be
    written (read-only) only means the spec is made again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(scratch, path)
    except OSError:
        Path(scratch).unlink(missing_ok=True)


def _default_template(template: Any) -> str | None:
    """A model with several named templates chats with its "default" one, as in transformers."""
    return template.get("default") if isinstance(template, dict) else template
