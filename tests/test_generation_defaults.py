"""The sampling values a request leaves out, from the model's generation_config.json, as vLLM takes them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_config import _args
from test_frontend_app import ScriptedEngine, post

from sfllm.config import ConfigError, load_config
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.messages import SamplingDefaults
from sfllm.model_source.generation_defaults import sampling_defaults

# Qwen3's generation_config.json, as the hub has it
QWEN3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
         "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51.0"}


def folder_with(tmp_path: Path, config: dict, name: str = "model") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_the_models_file_gives_the_values_vllm_reads_and_overrides_go_over_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    qwen3 = folder_with(tmp_path, QWEN3)
    assert sampling_defaults("auto", qwen3) == SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20)
    assert sampling_defaults("auto", None) == SamplingDefaults(), "a preset has no file"
    assert sampling_defaults("vllm", qwen3) == sampling_defaults("sfllm", qwen3) == SamplingDefaults()
    other = folder_with(tmp_path, {"temperature": 0.3, "max_new_tokens": 64, "min_p": 0.05,
                                   "repetition_penalty": 1.1}, "other")
    assert sampling_defaults(str(other), qwen3) == SamplingDefaults(temperature=0.3, min_p=0.05,
                                                                    repetition_penalty=1.1, max_tokens=64)
    assert sampling_defaults("auto", qwen3, {"temperature": 0.0, "max_new_tokens": 8}) == SamplingDefaults(
        temperature=0.0, top_p=0.95, top_k=20, max_tokens=8)
    assert sampling_defaults("vllm", qwen3, {"top_p": 0.5}) == SamplingDefaults(top_p=0.5)
    with caplog.at_level(logging.WARNING):  # vLLM takes keys it reads none of: a copied command line starts
        assert sampling_defaults("vllm", None, {"do_sample": True, "top_p": 0.5}) == SamplingDefaults(top_p=0.5)
    assert "do_sample not read" in caplog.text
    caplog.clear()
    odd = folder_with(tmp_path, {"temperature": "hot", "top_p": 0.0, "top_k": 40, "repetition_penalty": None}, "odd")
    with caplog.at_level(logging.WARNING):
        assert sampling_defaults("auto", odd) == SamplingDefaults(top_k=40), "what a request could not give is left out"
    assert "temperature" in caplog.text and "top_p must be in (0, 1]" in caplog.text


def test_the_settings_as_flags_keys_and_environment_and_their_errors(tmp_path: Path) -> None:
    config = load_config(_args("--generation-config", "vllm", "--override-generation-config",
                               '{"temperature": 0.5, "max_new_tokens": 32}'), environ={})
    assert (config.generation_config, config.override_generation_config) == (
        "vllm", {"temperature": 0.5, "max_new_tokens": 32})
    assert config.engine().override_generation_config == {"temperature": 0.5, "max_new_tokens": 32}
    assert load_config(environ={"SFLLM_OVERRIDE_GENERATION_CONFIG": '{"top_k": 5}'}).override_generation_config == {
        "top_k": 5}
    assert load_config(environ={}, override_generation_config={"min_p": 0.1}).override_generation_config == {
        "min_p": 0.1}
    assert load_config(environ={}).generation_config == "auto"
    # SGLang's --sampling-defaults in sfllm's words; flags of theirs that change nothing here are accepted
    sglang = load_config(_args("--sampling-defaults", "openai", "--enable-metrics", "--disable-log-requests"),
                         environ={})
    assert sglang.generation_config == "sfllm"
    assert load_config(environ={}, sampling_defaults="model").generation_config == "auto"
    folder = folder_with(tmp_path, QWEN3)
    assert load_config(environ={}, generation_config=str(folder)).generation_config == str(folder)
    for given, message in [
            ({"override_generation_config": "{temperature: 1}"}, "override_generation_config must be a JSON object"),
            ({"override_generation_config": "[1]"}, "override_generation_config must be a JSON object"),
            ({"override_generation_config": {"temperature": 3}}, r"temperature must be in \[0, 2\]"),
            ({"override_generation_config": {"max_new_tokens": 0}}, "max_tokens must be at least 1"),
            ({"generation_config": str(tmp_path / "nowhere")}, "generation_config must be auto .*, vllm"),
            ({"generation_config": "model"}, "generation_config must be auto .*, vllm"),
            ({"generation_config": str(folder_with(tmp_path, {"top_p": 2}, "named"))}, "top_p must be in"),
            ({"sampling_defaults": "modle"}, r"generation_config must be auto \(SGLang's model\).* \(given as "
                                             r"sampling_defaults\)")]:
        with pytest.raises(ConfigError, match=message):
            load_config(environ={}, **given)


def test_the_engine_tells_its_frontends_the_models_values(tmp_path: Path) -> None:
    from sfllm.engine.engine_process import _model_for_frontends
    folder = folder_with(tmp_path, QWEN3)
    _, defaults, grammars = _model_for_frontends(load_config(environ={}, generation_config=str(folder),
                                                             override_generation_config={"top_k": 30}).engine())
    grammars.result()
    assert defaults == SamplingDefaults(temperature=0.6, top_p=0.95, top_k=30)
    _, defaults, grammars = _model_for_frontends(load_config(environ={}).engine())
    grammars.result()
    assert defaults == SamplingDefaults(), "the bundled model's file (from its GGUF) recommends nothing"


def test_a_request_takes_the_models_values_for_what_it_leaves_out(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, sampling_defaults=SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20,
                                                                          min_p=0.01, repetition_penalty=1.05,
                                                                          max_tokens=5))
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    for path, body in [("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "Hi"}),
                       ("/generate", {"text": "Hi"}), ("/v1/responses", {"input": "Hi"})]:
        answer = post(engine, tokenizer, path, body)
        assert answer.status_code == 200, path
        params = engine.requests[-1].params
        assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
                params.max_tokens) == (0.6, 0.95, 20, 0.01, 1.05, 5), path
    echoed = answer.json()  # the Responses API echoes what ran, as vLLM does
    assert (echoed["temperature"], echoed["top_p"], echoed["max_output_tokens"]) == (0.6, 0.95, 5)
    explicit = {"temperature": 0, "top_p": 1, "top_k": 0, "min_p": 0, "repetition_penalty": 1, "max_tokens": 9}
    assert post(engine, tokenizer, "/v1/chat/completions", chat | explicit).status_code == 200
    params = engine.requests[-1].params
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty,
            params.max_tokens) == (0.0, 1.0, -1, 0.0, 1.0, 9), "a request's own values stand (top_k 0: off)"
    engine = ScriptedEngine(tokenizer, sampling_defaults=SamplingDefaults(max_tokens=40))
    assert post(engine, tokenizer, "/v1/completions", {"prompt": "Hi"}).status_code == 200
    assert engine.requests[-1].params.max_tokens == 16, "the smaller of the endpoint's default and the model's"
    assert post(engine, tokenizer, "/v1/chat/completions", chat).status_code == 200
    assert engine.requests[-1].params.max_tokens == 40
    assert engine.requests[-1].params.temperature == 1.0, "sfllm's own where the model recommends nothing"
