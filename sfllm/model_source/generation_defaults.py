"""The sampling values a request leaves out, from the model's generation_config.json, as vLLM reads them.

vLLM (`--generation-config auto`, its default) and SGLang (`--sampling-defaults model`) take a request's missing
temperature, top_p, top_k, min_p and repetition_penalty from the model's generation_config.json, and its missing
max_tokens from max_new_tokens: Qwen3's file asks for temperature 0.6, top_p 0.95 and top_k 20, and a client that
sends none of them gets those there. sfllm does the same on every endpoint and in `LLM.generate` without
SamplingParams. The file's values are taken as written, as vLLM reads them with transformers 5 (transformers 4's
diff against its own defaults left out a top_k of 50). One difference: vLLM also caps a request's own max_tokens at
max_new_tokens; here a request's value stands (OpenAI's meaning of it).

`generation_config`: "auto" (the model's file), "vllm" or "sfllm" (none: sfllm's own defaults, OpenAI's), or a
folder holding a generation_config.json; `override_generation_config` sets values over either, as vLLM's flag.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from sfllm.messages import SamplingDefaults
from sfllm.sampling_params import InvalidSamplingParams, SamplingParams

logger = logging.getLogger(__name__)

OWN_DEFAULTS = ("vllm", "sfllm")  # generation_config values that read no file (vLLM's name, and ours)
# generation_config.json's keys that vLLM reads, and the sampling field each sets
GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
FILE_NAME = "generation_config.json"


class GenerationConfigError(ValueError):
    pass


def check_generation_config_setting(setting: str) -> None:
    """Raises GenerationConfigError unless `setting` is auto, vllm, sfllm or a folder holding the file."""
    if setting == "auto" or setting in OWN_DEFAULTS:
        return
    folder = Path(setting).expanduser()
    if not (folder / FILE_NAME).is_file():
        raise GenerationConfigError(f"must be auto (SGLang's model), vllm (sfllm's own defaults; SGLang's openai) "
                                    f"or a folder holding {FILE_NAME}; {setting!r} is none of them")
    for key, value in _read(folder / FILE_NAME).items():  # a file the operator named: its values must all hold
        problem = _problem(key, value) if key in GENERATION_CONFIG_KEYS and value is not None else None
        if problem:
            raise GenerationConfigError(f"names {folder / FILE_NAME}, whose {problem}")


def check_overrides(overrides: Mapping[str, object]) -> None:
    """Raises GenerationConfigError for a value a request could not give. Other keys than those read are left
    to `sampling_defaults`, which warns of them: vLLM takes them and reads none (`do_sample`), so a copied command
    line starts."""
    for key, value in overrides.items():
        problem = _problem(key, value) if key in GENERATION_CONFIG_KEYS else None
        if problem:
            raise GenerationConfigError(problem)


def sampling_defaults(setting: str, model_folder: Path | None,
                      overrides: Mapping[str, object] | None = None) -> SamplingDefaults:
    """The defaults `setting` (see the module's docstring) and `overrides` give for the model in `model_folder`
    (None: a preset, which has no file). Values of the model's own file that a request could not give are left out,
    with a warning (a folder the operator names is checked whole by check_generation_config_setting)."""
    values: dict[str, object] = {}
    source = None
    if setting == "auto" and model_folder is not None and (model_folder / FILE_NAME).is_file():
        source = model_folder / FILE_NAME
    elif setting not in ("auto", *OWN_DEFAULTS):
        source = Path(setting).expanduser() / FILE_NAME
    if source is not None:
        for key, value in _read(source).items():
            if key not in GENERATION_CONFIG_KEYS or value is None:
                continue
            problem = _problem(key, value)
            if problem:
                logger.warning("%s: %s; left out", source, problem)
            else:
                values[key] = value
    read = {key: value for key, value in (overrides or {}).items() if key in GENERATION_CONFIG_KEYS}
    unread = sorted(set(overrides or {}) - set(read))
    if unread:
        logger.warning("override_generation_config: %s not read (the keys read are %s)", ", ".join(unread),
                       ", ".join(GENERATION_CONFIG_KEYS))
    values.update(read)
    defaults = SamplingDefaults(**{GENERATION_CONFIG_KEYS[key]: value for key, value in values.items()})
    if defaults.given():
        origins = ([str(source)] if source is not None else []) + (["override_generation_config"] if read else [])
        logger.info("sampling values a request leaves out, from %s: %s (generation_config vllm: sfllm's own)",
                    " and ".join(origins), ", ".join(f"{key} {value}" for key, value in defaults.given().items()))
    return defaults


def _read(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GenerationConfigError(f"cannot read {path}: {error}") from None
    if not isinstance(config, dict):
        raise GenerationConfigError(f"{path} must hold a JSON object")
    return config


def _problem(key: str, value: object) -> str | None:
    """What is wrong with `value` for `key`, as a request's own value would be refused; None if nothing."""
    field = GENERATION_CONFIG_KEYS[key]
    try:
        SamplingParams(**{field: value}).validate()
    except InvalidSamplingParams as error:
        return f"{key}: {error}"
    return None
