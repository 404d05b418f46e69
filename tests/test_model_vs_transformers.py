"""Greedy outputs of the offline engine, token for token against transformers (float32, CPU)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

from sfllm import LLM, SamplingParams
from sfllm.model_source import resolve_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "1, 2, 3, 4,",
    "Translate to French: I like apples. ->",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. Again:",
    "Q: What is 7 times 8?\nA:",
    "Water boils at a temperature of",
    "In machine learning, a transformer is a neural network architecture that relies on the mechanism of "
    "self-attention, introduced in the paper Attention Is All You Need. Its main advantage is",
]
NEW_TOKENS = 24


def reference_greedy(model: transformers.PreTrainedModel, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' own generate(), one prompt at a time (no padding), EOS ignored."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, attention_mask=torch.ones(1, len(prompt_ids)))
    return out[0, len(prompt_ids):].tolist()


def test_smollm2_greedy_matches_transformers_in_one_batch(smollm_llm: LLM, smollm_reference) -> None:
    token_lists = [smollm_llm.tokenizer.encode(p) for p in PROMPTS]
    chats = [smollm_llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:4]]
    all_prompts = token_lists + chats
    assert len({len(t) for t in all_prompts}) >= 8, "prompts of different lengths"
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = smollm_llm.generate(all_prompts, params)
    for prompt_ids, result in zip(all_prompts, results):
        expected = reference_greedy(smollm_reference, prompt_ids, NEW_TOKENS)
        assert result.outputs[0].token_ids == expected, smollm_llm.tokenizer.decode(prompt_ids)
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1], "every KV block free again"


def test_smollm2_chat_knows_the_capital_of_france(smollm_llm: LLM) -> None:
    result = smollm_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                             SamplingParams(temperature=0.0, max_tokens=32))[0]
    assert "Paris" in result.outputs[0].text
    assert result.outputs[0].finish_reason == "stop", "the chat turn ends at <|im_end|>, not at max_tokens"


def test_smollm2_continues_its_own_started_answer(smollm_llm: LLM) -> None:
    conversation = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "The capital of France is"}]
    result = smollm_llm.chat(conversation, SamplingParams(temperature=0.0, max_tokens=4), add_generation_prompt=False,
                             continue_final_message=True)[0]
    hf = transformers.AutoTokenizer.from_pretrained(smollm_llm.source.tokenizer_folder)
    assert result.prompt_token_ids == hf.apply_chat_template(conversation, add_generation_prompt=False,
                                                             continue_final_message=True)["input_ids"]
    assert result.outputs[0].text.strip().startswith("Paris"), result.outputs[0].text


def _write_tiny_checkpoint(folder: Path, architecture: str, tokenizer_folder: Path) -> None:
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, initializer_range=0.2)
    if architecture == "qwen3":
        config = transformers.Qwen3Config(head_dim=16, tie_word_embeddings=False, **common)
        model = transformers.Qwen3ForCausalLM(config)
    elif architecture == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128}, **common)
        model = transformers.LlamaForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)  # norms away from one, so a missing norm shows
            elif name.endswith("bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, folder / name)


@pytest.mark.parametrize("architecture", ["qwen3", "qwen2", "llama"])
def test_tiny_random_checkpoints_match_transformers(architecture: str, tmp_path: Path, smollm_source) -> None:
    _write_tiny_checkpoint(tmp_path, architecture, smollm_source.tokenizer_folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", cache_dir=str(tmp_path / "cache"),
              max_context_length=256)
    prompts = [[(7 * i + 13 * j) % 49000 + 100 for j in range(length)] for i, length in
               enumerate([1, 5, 16, 17, 33, 64, 100, 3])]
    results = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        assert result.outputs[0].token_ids == reference_greedy(reference, prompt, 20), f"prompt of {len(prompt)}"
    assert llm.kv_usage()[0] == llm.kv_usage()[1]


def test_default_model_resolves_with_the_right_eos(smollm_source) -> None:
    im_end = smollm_source.tokenizer_id("<|im_end|>")
    assert im_end in smollm_source.source.config.eos_token_ids


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model("/definitely/no-such-model")


def _check_against(entries: dict, token_id: int, expected: torch.Tensor, num_top: int) -> None:
    """One position's logprobs (vLLM's dict by token id) against transformers' log-softmax row there: the token's
    own logprob and rank (within the tolerance of near ties), and the top alternatives in rank order."""
    own = entries[token_id]
    assert next(iter(entries)) == token_id, "the token's own entry comes first, as in vLLM"
    torch.testing.assert_close(torch.tensor(own.logprob), expected[token_id], atol=2e-3, rtol=0)
    surely_above = (expected > expected[token_id] + 2e-3).sum() + 1
    assert surely_above <= own.rank <= (expected > expected[token_id] - 2e-3).sum() + 1
    top_values, top_ids = expected.topk(num_top)
    ranked = sorted((entry.rank, t, entry.logprob) for t, entry in entries.items() if entry.rank <= num_top)
    assert len(entries) in (num_top, num_top + 1) and [rank for rank, _, _ in ranked] == list(range(1, num_top + 1))
    assert ranked[0][1] == top_ids[0]
    torch.testing.assert_close(torch.tensor([lp for _, _, lp in ranked]), top_values, atol=2e-3, rtol=0)


def test_logprobs_match_transformers_log_softmax(smollm_llm: LLM, smollm_reference) -> None:
    """Each prompt token's logprob given the tokens before it, and each sampled token's, with their ranks and the
    top alternatives, against transformers' log-softmax over the same weights (float32); a repeated prompt (a
    prefix-cache hit otherwise) and a prompt split into prefill chunks give the same numbers."""
    prompts = [smollm_llm.tokenizer.encode(p) for p in PROMPTS[:3] + PROMPTS[-1:]]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
    first = smollm_llm.generate(prompts, params)
    again = smollm_llm.generate(prompts, params)
    for prompt_ids, result, repeated in zip(prompts, first, again):
        with torch.no_grad():
            logits = smollm_reference(torch.tensor([prompt_ids])).logits[0].float()
        expected = torch.log_softmax(logits, dim=-1)
        got = result.prompt_logprobs
        assert got[0] is None and len(got) == len(prompt_ids), "vLLM's layout: None for the first prompt token"
        for position, (token_id, entries) in enumerate(zip(prompt_ids[1:], got[1:])):
            _check_against(entries, token_id, expected[position], 3)
            assert all(entry.decoded_token == smollm_llm.tokenizer.token_decoded(t) for t, entry in entries.items())
        assert repeated.prompt_logprobs == got
    assert first[-1].num_cached_tokens == again[-1].num_cached_tokens == 0, "such requests bypass the prefix cache"
    # sampled tokens (not greedy: their ranks vary), each given the prompt and the tokens drawn before it
    prompt_ids = prompts[0]
    sampled = smollm_llm.generate([prompt_ids], SamplingParams(temperature=1.5, seed=5, max_tokens=6, logprobs=2,
                                                               ignore_eos=True))[0].outputs[0]
    with torch.no_grad():
        logits = smollm_reference(torch.tensor([prompt_ids + sampled.token_ids[:-1]])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1:]
    assert len(sampled.logprobs) == len(sampled.token_ids) == 6
    for position, (token_id, entries) in enumerate(zip(sampled.token_ids, sampled.logprobs)):
        _check_against(entries, token_id, expected[position], 2)
    assert any(entries[t].rank > 1 for t, entries in zip(sampled.token_ids, sampled.logprobs)), \
        "a hot sample draws a token other than the likeliest at least once here"
    assert sampled.cumulative_logprob == pytest.approx(expected.gather(1, torch.tensor(sampled.token_ids)[:, None]
                                                                       ).sum().item(), abs=1e-2)
    # by vLLM's and SGLang's names for the settings, as their users pass them
    chunked = LLM(model_path="smollm2-135m-instruct", dtype="float32", device="cpu", max_num_batched_tokens=16,
                  max_model_len=256)
    assert (chunked.config.max_running_tokens, chunked.max_context_length) == (16, 256)
    long_prompt = prompts[-1]
    split = chunked.generate([long_prompt], params)[0].prompt_logprobs
    assert len(long_prompt) > 16
    torch.testing.assert_close(torch.tensor([entries[t].logprob for t, entries in zip(long_prompt[1:], split[1:])]),
                               torch.tensor([entries[t].logprob for t, entries in
                                             zip(long_prompt[1:], first[-1].prompt_logprobs[1:])]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("min_tokens", [1, 12])
def test_min_tokens_holds_off_the_end_as_transformers_min_new_tokens(smollm_llm: LLM, smollm_reference,
                                                                    min_tokens: int) -> None:
    """A chat answer that greedy decoding ends after a few tokens, made to go on: the same tokens as
    transformers' min_new_tokens (EOS masked until then), EOS included where both end."""
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompt_ids = smollm_llm.tokenizer.apply_chat_template(question)
    eos = list(smollm_llm.source.config.eos_token_ids)
    plain = smollm_llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=20))[0].outputs[0]
    assert plain.finish_reason == "stop" and len(plain.token_ids) < 12, "the premise: the answer ends early"
    result = smollm_llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=20,
                                                              min_tokens=min_tokens))[0].outputs[0]
    with torch.no_grad():
        out = smollm_reference.generate(torch.tensor([prompt_ids]), max_new_tokens=20, min_new_tokens=min_tokens,
                                        do_sample=False, eos_token_id=eos, pad_token_id=0,
                                        attention_mask=torch.ones(1, len(prompt_ids)))
    expected = out[0, len(prompt_ids):].tolist()
    assert len(result.token_ids) >= min_tokens
    assert result.token_ids == expected[:len(result.token_ids)] and len(result.token_ids) in (len(expected),
                                                                                             len(expected) - 1)
    assert not set(result.token_ids[:min_tokens]) & set(eos)
    # a stop token id and a stop string that the first tokens hold are passed over until min_tokens
    first_word = plain.token_ids[0]
    held = smollm_llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=20, min_tokens=min_tokens,
                                                            stop_token_ids=[first_word], stop=[plain.text[:4]]))
    output = held[0].outputs[0]
    assert len(output.token_ids) >= min_tokens and first_word not in output.token_ids[:min_tokens]
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1], "every KV block free again"
