"""The offline `LLM` API on the real model: sampling, stops, n, logprobs, and clear errors."""
from __future__ import annotations

import math

import msgspec
import pytest

from sfllm import SamplingParams
from sfllm.llm import GenerationError
from sfllm.sampling_params import InvalidSamplingParams
from sfllm.worker.attention.registry import BackendUnavailable, resolve_backend_name

PROMPT = "Once upon a time"


def test_seeded_sampling_repeats_and_differs_across_seeds(smollm_llm) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=seed, ignore_eos=True)
        return smollm_llm.generate(PROMPT, params)[0].outputs[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_one_equals_greedy(smollm_llm) -> None:
    greedy = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    top1 = smollm_llm.generate(PROMPT, SamplingParams(temperature=1.3, top_k=1, max_tokens=8, ignore_eos=True))
    assert top1[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids


def test_stop_string_is_cut_from_the_text(smollm_llm) -> None:
    full = smollm_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0]
    assert "7" in full.text
    stopped = smollm_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=12,
                                                                stop=[" 7"]))[0].outputs[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(" 7")]
    # a stop string that spans two tokens (", 6" is ",", " 6"), kept when asked
    kept = smollm_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=12, stop=[", 6"],
                                                             include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text.endswith(", 6") and kept.text == full.text[:full.text.index(", 6") + 3]


def test_stop_token_ids_and_max_tokens(smollm_llm) -> None:
    full = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert full.outputs[0].finish_reason == "length" and len(full.outputs[0].token_ids) == 6
    third = full.outputs[0].token_ids[2]
    stopped = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[third]))[0]
    assert stopped.outputs[0].token_ids == full.outputs[0].token_ids[:3]
    assert stopped.outputs[0].finish_reason == "stop"


def test_n_and_logprobs(smollm_llm) -> None:
    result = smollm_llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=5, n=3, seed=1, logprobs=2,
                                                        ignore_eos=True))[0]
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1
    for output in result.outputs:
        assert len(output.logprobs) == 5
        for token, entry in zip(output.token_ids, output.logprobs):
            assert entry.logprob <= 0 and len(entry.top) == 2
            assert entry.top[0].logprob >= entry.top[1].logprob
            assert entry.logprob <= entry.top[0].logprob + 1e-5
            assert math.isfinite(entry.logprob)


def test_n_choices_wrap_their_seeds_into_int64_as_the_server_does(smollm_llm) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    wrapped = smollm_llm.generate(PROMPT, msgspec.structs.replace(params, seed=2**63 - 1, n=2))[0].outputs
    alone = [smollm_llm.generate(PROMPT, msgspec.structs.replace(params, seed=seed))[0].outputs[0].token_ids
             for seed in (2**63 - 1, 0)]
    assert [output.token_ids for output in wrapped] == alone, "the second choice's seed is 2^63 wrapped to 0"


def test_every_block_is_free_after_the_requests(smollm_llm) -> None:
    smollm_llm.generate([PROMPT] * 5, SamplingParams(temperature=0.0, max_tokens=4))
    free, total = smollm_llm.kv_usage()
    assert free == total


@pytest.mark.parametrize("params, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=0), "top_k"),
    (dict(n=0), "n"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_invalid_sampling_values_are_refused(smollm_llm, params: dict, field: str) -> None:
    with pytest.raises(InvalidSamplingParams) as error:
        smollm_llm.generate(PROMPT, SamplingParams(**params))
    assert error.value.param == field


def test_prompt_longer_than_the_context_names_the_numbers(smollm_llm) -> None:
    prompt = [100] * (smollm_llm.max_context_length + 5)
    with pytest.raises(GenerationError, match=str(smollm_llm.max_context_length)):
        smollm_llm.generate([prompt], SamplingParams(max_tokens=1))
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]


def test_triton_backend_on_cpu_without_the_interpreter_is_refused(monkeypatch) -> None:
    import torch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="torch backend"):
        resolve_backend_name("triton", torch.device("cpu"))
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"
