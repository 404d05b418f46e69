"""Scheduling must not change what a real model generates: prefix caching, chunked prefill and
preemption (recompute and swap) give the outputs of a plain run; high priority cuts the queue.

A tiny random Qwen3 checkpoint keeps a step in milliseconds on CPU.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from sfllm import LLM, SamplingParams
from sfllm.messages import ForwardBatch, GenerateRequest
from sfllm.model_source.dummy_tokenizer import dummy_tokenizer_folder

CONTEXT = 128  # 8 blocks of 16: the smallest pool the engine accepts, too small for the batches below


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen3")
    config = transformers.Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=CONTEXT, rms_norm_eps=1e-6, initializer_range=0.2,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)
    tokenizer = dummy_tokenizer_folder(tmp_path_factory.mktemp("tokenizer-cache"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return folder


def make_llm(model: Path, **config) -> LLM:
    return LLM(model=str(model), dtype="float32", device="cpu", cache_dir=str(model / "cache"),
               max_context_length=CONTEXT, **config)


def prompts() -> list[list[int]]:
    """Nine prompts; six share a 40-token head (two whole blocks and a part)."""
    head = [(11 * j) % 900 + 50 for j in range(40)]
    tails = [[(7 * i + 13 * j) % 900 + 50 for j in range(length)] for i, length in enumerate([1, 9, 16, 23, 30, 3])]
    alone = [[(5 * i + 3 * j) % 900 + 60 for j in range(length)] for i, length in enumerate([5, 33, 48])]
    return [head + tail for tail in tails] + alone


GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def token_ids(results) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in results]


def record_batches(llm: LLM) -> list[ForwardBatch]:
    """Every batch the engine sends to its worker from now on."""
    batches: list[ForwardBatch] = []
    worker = llm.engine.worker
    submit = worker.submit

    def record(batch: ForwardBatch) -> None:
        batches.append(batch)
        submit(batch)

    worker.submit = record
    return batches


def assert_all_blocks_free(llm: LLM) -> None:
    free, total = llm.kv_usage()
    assert free == total, f"{total - free} KV blocks still held"
    swap = llm.engine.scheduler.swap_space
    assert swap.num_free == swap.num_blocks


@pytest.fixture(scope="module")
def baseline(tiny_model: Path) -> list[list[int]]:
    """One request at a time, no prefix cache, no chunking: nothing the scheduler does can matter."""
    llm = make_llm(tiny_model, disable_prefix_cache=True, max_running_tokens=4096, max_running_requests=1)
    outputs = token_ids(llm.generate(prompts(), GREEDY))
    assert llm.engine.scheduler.num_preemptions == 0
    assert len({tuple(o) for o in outputs}) == len(outputs), "the model tells prompts apart"
    return outputs


def test_prefix_cache_gives_the_same_greedy_outputs(tiny_model: Path, baseline: list[list[int]]) -> None:
    llm = make_llm(tiny_model)
    first = llm.generate(prompts(), GREEDY)
    second = llm.generate(prompts(), GREEDY)
    assert token_ids(first) == token_ids(second) == baseline
    assert [r.num_cached_tokens for r in second] == [32, 48, 48, 48, 64, 32, 0, 32, 32], "whole blocks hit"
    stats = llm.engine.scheduler.stats()
    assert stats["prefix_cache_hits"] > 0 and stats["num_cached_prompt_tokens"] >= 336
    assert stats["prefix_cache_hits"] <= stats["prefix_cache_queries"]
    assert stats["num_prompt_tokens"] == 2 * sum(len(p) for p in prompts())
    assert_all_blocks_free(llm)
    # flushed (/flush_cache): the next run finds only what it caches itself, as the first did
    assert llm.engine.scheduler.allocator.forget_cached() > 0 and llm.engine.scheduler.allocator.num_cached == 0
    third = llm.generate(prompts(), GREEDY)
    assert token_ids(third) == baseline
    assert [r.num_cached_tokens for r in third] == [r.num_cached_tokens for r in first] != \
        [r.num_cached_tokens for r in second]
    assert_all_blocks_free(llm)


def test_chunked_prefill_gives_the_same_greedy_outputs(tiny_model: Path, baseline: list[list[int]]) -> None:
    llm = make_llm(tiny_model, max_running_tokens=16, disable_prefix_cache=True)
    batches = record_batches(llm)
    assert token_ids(llm.generate(prompts(), GREEDY)) == baseline
    assert max(sum(b.num_new_tokens) for b in batches) == 16, "prompts of up to 70 tokens went in chunks"
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_preemption_on_a_tiny_pool_gives_the_same_greedy_outputs(tiny_model: Path, baseline: list[list[int]],
                                                                  preemption_mode: str) -> None:
    llm = make_llm(tiny_model, num_kv_blocks=CONTEXT // 16, preemption_mode=preemption_mode, max_running_tokens=64)
    assert llm.kv_usage()[1] == 8
    batches = record_batches(llm)
    assert token_ids(llm.generate(prompts(), GREEDY)) == baseline
    assert llm.engine.scheduler.num_preemptions > 0
    swapped = sum(len(b.swap_out) for b in batches)
    assert swapped == sum(len(b.swap_in) for b in batches) and (swapped > 0) == (preemption_mode == "swap")
    assert_all_blocks_free(llm)


def test_seeded_sampling_is_reproducible_under_preemption(tiny_model: Path) -> None:
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=40, ignore_eos=True)
              for i in range(len(prompts()))]
    roomy = make_llm(tiny_model)
    tight = make_llm(tiny_model, num_kv_blocks=CONTEXT // 16, preemption_mode="swap", max_running_tokens=32)
    expected = token_ids(roomy.generate(prompts(), params))
    assert token_ids(tight.generate(prompts(), params)) == expected
    assert roomy.engine.scheduler.num_preemptions == 0 and tight.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(tight)


def steps_to_first_token(llm: LLM, request_id: str, prompt: list[int], priority: str) -> int:
    """Engine steps from the request's arrival until its first token is out."""
    error = llm.engine.add_request(GenerateRequest(request_id=request_id, prompt_token_ids=prompt, priority=priority,
                                                   params=SamplingParams(temperature=0.0, max_tokens=4)))
    assert error is None
    for steps in range(1, 1000):
        if any(out.request_id == request_id and out.token_ids for out in llm.engine.step()):
            return steps
    raise AssertionError(f"{request_id} got no token in 1000 steps")


def flood(llm: LLM, count: int) -> None:
    """Background requests that fill every slot and then some."""
    for i in range(count):
        prompt = [(3 * i + 7 * j) % 900 + 50 for j in range(20)]
        llm.engine.add_request(GenerateRequest(request_id=f"bg-{llm.engine.num_steps}-{i}", prompt_token_ids=prompt,
                                               priority="background",
                                               params=SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)))
    for _ in range(6):
        llm.engine.step()


def drain(llm: LLM) -> None:
    while llm.engine.has_work():
        llm.engine.step()


def test_high_priority_first_token_stays_fast_under_a_background_flood(tiny_model: Path) -> None:
    llm = make_llm(tiny_model, max_running_requests=4, max_background_wait_s=1e6)
    prompt = [(17 * j) % 900 + 50 for j in range(30)]
    unloaded = steps_to_first_token(llm, "alone", prompt, "high")
    drain(llm)
    flood(llm, 12)
    assert llm.engine.scheduler.stats()["running"]["background"] == 4
    # control: a normal request outranks background in the queue but waits for a slot
    normal = steps_to_first_token(llm, "normal", prompt, "normal")
    assert llm.engine.scheduler.num_preemptions == 0
    loaded = steps_to_first_token(llm, "high", prompt, "high")
    assert llm.engine.scheduler.num_preemptions == 0, "the high request took a slot of its own, past the batch limit"
    drain(llm)
    assert loaded <= 2 * unloaded, (unloaded, loaded)
    assert normal >= 10 * unloaded, "the measure tells a queued request from a preferred one"
    assert_all_blocks_free(llm)
