"""The offline `LLM` API on the real model: sampling, stops, n, logprobs, and clear errors."""
from __future__ import annotations

import gc
import json
import math
import re
from typing import Any

import msgspec
import pytest

from sfllm import SamplingParams, StructuredOutput, gc_pauses
from sfllm.config import HIGH_PRIORITY_STEP_TOKENS
from sfllm.llm import GenerationError
from sfllm.sampling_params import InvalidSamplingParams, StructuredOutputsParams
from sfllm.worker.attention.registry import BackendUnavailable, resolve_backend_name

PROMPT = "Once upon a time"


def test_seeded_sampling_repeats_and_differs_across_seeds(smollm_llm) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=8, seed=seed, ignore_eos=True)
        return smollm_llm.generate(PROMPT, params)[0].outputs[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)
    # any int64, as vLLM takes it: a negative seed repeats too, drawing as s + 2^63 (the worker's seeds are
    # [0, 2^63)), so distinct negative seeds differ
    assert run(-7) == run(-7) == run(2**63 - 7)
    assert run(-7) != run(-8)


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
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == third
    # as vLLM: the stop token's id is output, its text only when asked for
    decode = smollm_llm.tokenizer.decode
    assert stopped.outputs[0].text == decode(full.outputs[0].token_ids[:2]) != decode(full.outputs[0].token_ids[:3])
    kept = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[third],
                                                      include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == decode(full.outputs[0].token_ids[:3])
    assert full.outputs[0].stop_reason is None


def test_eos_text_is_left_out_even_with_special_tokens_shown(smollm_llm) -> None:
    messages = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    answer = smollm_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=40,
                                                      skip_special_tokens=False))[0].outputs[0]
    assert answer.finish_reason == "stop" and answer.token_ids[-1] in smollm_llm.engine.worker.info.eos_token_ids
    assert answer.text == smollm_llm.tokenizer.decode(answer.token_ids[:-1], skip_special_tokens=False)
    assert "<|im_end|>" not in answer.text and answer.stop_reason is None  # vLLM's stop_reason: none for EOS


def test_n_and_logprobs(smollm_llm) -> None:
    result = smollm_llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=5, n=3, seed=1, logprobs=2,
                                                        ignore_eos=True))[0]
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1
    for output in result.outputs:
        assert len(output.logprobs) == 5
        for token, entries in zip(output.token_ids, output.logprobs):  # vLLM's: a dict by token id a position
            own = entries[token]
            assert next(iter(entries)) == token and own.logprob <= 0 and math.isfinite(own.logprob)
            by_rank = {entry.rank: entry for entry in entries.values()}
            assert len(entries) in (2, 3) and {1, 2} <= set(by_rank), "the sampled token and the top two"
            assert by_rank[1].logprob >= by_rank[2].logprob >= min(e.logprob for e in entries.values())
            assert own.rank >= 1 and own.logprob <= by_rank[1].logprob + 1e-5
            assert own.rank > 2 or own is by_rank[own.rank]
            assert all(entry.decoded_token == smollm_llm.tokenizer.token_decoded(t) for t, entry in entries.items())


def test_n_choices_wrap_their_seeds_into_int64_as_the_server_does(smollm_llm) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    wrapped = smollm_llm.generate(PROMPT, msgspec.structs.replace(params, seed=2**63 - 1, n=2))[0].outputs
    alone = [smollm_llm.generate(PROMPT, msgspec.structs.replace(params, seed=seed))[0].outputs[0].token_ids
             for seed in (2**63 - 1, 0)]
    assert [output.token_ids for output in wrapped] == alone, "the second choice's seed is 2^63 wrapped to 0"


def test_more_prompts_than_the_waiting_queue_holds_all_finish(smollm_llm, monkeypatch) -> None:
    """`max_waiting_requests` bounds a server's clients; an offline list longer than it waits for room instead of
    failing (4,096 by default: a large offline batch went past it)."""
    prompts = [f"{i} + {i} =" for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    expected = [r.outputs[0].token_ids for r in smollm_llm.generate(prompts, params)]
    monkeypatch.setattr(smollm_llm.engine.scheduler.waiting, "max_per_class", 2)
    assert [r.outputs[0].token_ids for r in smollm_llm.generate(prompts, params)] == expected
    assert [len(o.token_ids) for o in smollm_llm.generate(PROMPT, SamplingParams(n=3, max_tokens=2))[0].outputs] == [2] * 3
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]


def test_a_prompt_the_engine_refuses_fails_the_call_before_any_runs(smollm_llm, monkeypatch) -> None:
    """Past the waiting queue's room the prompts are added as it frees: one that can never run (too long, a token
    outside the vocabulary) fails the call at once, not after the ones before it ran."""
    steps = []
    step = smollm_llm.engine.step
    monkeypatch.setattr(smollm_llm.engine, "step", lambda: steps.append(1) or step())
    monkeypatch.setattr(smollm_llm.engine.scheduler.waiting, "max_per_class", 2)
    too_long = [1] * smollm_llm.max_context_length
    with pytest.raises(GenerationError, match="context length"):
        smollm_llm.generate([PROMPT] * 4 + [{"prompt_token_ids": too_long}], SamplingParams(max_tokens=2))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        smollm_llm.generate([PROMPT] * 4 + [{"prompt_token_ids": [1, 10**7]}], SamplingParams(max_tokens=2))
    assert not steps, "nothing ran"
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1] and not smollm_llm.engine.scheduler.requests
    good = SamplingParams(max_tokens=2, structured_output=StructuredOutput.regex("[0-9]+"))
    assert all(o.outputs[0].finish_reason for o in smollm_llm.generate([PROMPT] * 3, good)), "one grammar, checked once"


def test_every_block_is_free_after_the_requests(smollm_llm) -> None:
    smollm_llm.generate([PROMPT] * 5, SamplingParams(temperature=0.0, max_tokens=4))
    free, total = smollm_llm.kv_usage()
    assert free == total


@pytest.mark.skipif(not gc_pauses._GENERATIONAL, reason="a collector without a full generation to put off")
def test_no_full_collection_runs_inside_a_generate(smollm_llm, monkeypatch) -> None:
    # one over torch's and the engine's objects stalled the GPU for 220 ms in the middle of a run
    thresholds_in_steps = []
    step = smollm_llm.engine.step
    monkeypatch.setattr(smollm_llm.engine, "step", lambda: thresholds_in_steps.append(gc.get_threshold()) or step())
    chosen = gc.get_threshold()
    gc.set_threshold(500, 7, 9)  # the caller's, to be given back as they were
    try:
        smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3))
        assert thresholds_in_steps and all(t[:2] == (500, 7) and t[2] >= 1 << 30 for t in thresholds_in_steps)
        assert gc.get_threshold() == (500, 7, 9)
    finally:
        gc.set_threshold(*chosen)


@pytest.mark.skipif(not gc_pauses._GENERATIONAL, reason="a collector without a full generation to put off")
def test_a_full_collection_put_off_for_long_runs_when_the_generate_ends(smollm_llm, monkeypatch) -> None:
    events = []
    step = smollm_llm.engine.step
    monkeypatch.setattr(smollm_llm.engine, "step", lambda: events.append("step") or step())

    def full_collections(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            events.append("full collection")
    gc.callbacks.append(full_collections)
    try:
        monkeypatch.setattr(gc_pauses, "_OVERDUE", 1 << 30)  # not overdue: none
        smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3))
        assert "full collection" not in events
        monkeypatch.setattr(gc_pauses, "_OVERDUE", 0)  # overdue: one, after the steps
        events.clear()
        smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3))
        assert events[-1] == "full collection" and events.count("full collection") == 1 and "step" in events
    finally:
        gc.callbacks.remove(full_collections)


def test_the_worker_names_its_device_and_the_engine_takes_its_defaults(smollm_llm) -> None:
    assert smollm_llm.engine.worker.info.device_type == "cpu"
    assert smollm_llm.engine.scheduler.config.high_priority_step_tokens == HIGH_PRIORITY_STEP_TOKENS["cpu"]


@pytest.mark.parametrize("params, field", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_tokens="8"), "max_tokens"),
    (dict(stop=["x"], detokenize=False), "stop"),
    (dict(temperature="0.5"), "temperature"),
])
def test_invalid_sampling_values_are_refused(smollm_llm, params: dict, field: str) -> None:
    with pytest.raises(InvalidSamplingParams) as error:
        smollm_llm.generate(PROMPT, SamplingParams(**params))
    assert error.value.param == field


def test_vllm_spellings_of_sampling_params_mean_what_they_mean_there(smollm_llm, monkeypatch) -> None:
    """None for the lists and the bias, top_k 0 (off), logprobs True (one), a temperature under 0.01 (0.01: 1e-38
    drew token 0 over and over), max_tokens None (what the context leaves); vLLM's output fields."""
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    expected = smollm_llm.generate(PROMPT, greedy)[0].outputs[0]
    spelled = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, stop=None, stop_token_ids=None,
                             bad_words=None, logit_bias=None, top_k=0, logprobs=True)
    output = smollm_llm.generate(PROMPT, spelled)[0].outputs[0]
    assert output.token_ids == expected.token_ids and len(output.logprobs) == 4
    assert all(list(entries) == [t] and entries[t].rank == 1
               for t, entries in zip(output.token_ids, output.logprobs)), "greedy: the likeliest, the one asked for"
    assert output.cumulative_logprob == pytest.approx(sum(entries[t].logprob for t, entries in
                                                          zip(output.token_ids, output.logprobs)))
    assert output.cumulative_logprob < 0 and expected.cumulative_logprob is None
    assert SamplingParams(temperature=1e-38).temperature == 0.01
    tiny = smollm_llm.generate(PROMPT, SamplingParams(temperature=1e-38, max_tokens=4, ignore_eos=True, seed=3))
    assert 0 not in tiny[0].outputs[0].token_ids and tiny[0].outputs[0].text
    ids = smollm_llm.tokenizer.encode(PROMPT)
    monkeypatch.setattr(type(smollm_llm), "max_context_length", property(lambda self: len(ids) + 3))
    result = smollm_llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert (len(result.outputs[0].token_ids), result.outputs[0].finish_reason) == (3, "length")
    assert result.finished and result.outputs[0].finished() and result.request_id.startswith("offline-")


def test_get_tokenizer_is_transformers_and_agrees_with_the_engine(smollm_llm) -> None:
    """vLLM's `llm.get_tokenizer()`, as code written for vLLM uses it: its chat template's text, given to
    generate, is the prompt LLM.chat makes; its EOS is the model's; it decodes the output to the output's text."""
    tokenizer = smollm_llm.get_tokenizer()
    assert tokenizer is smollm_llm.get_tokenizer() and type(tokenizer).__module__.startswith("transformers")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    chat = smollm_llm.chat(messages, params)[0]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    templated = smollm_llm.generate(text, params)[0]
    assert templated.prompt_token_ids == chat.prompt_token_ids == tokenizer.encode(text)
    assert templated.outputs[0].token_ids == chat.outputs[0].token_ids
    assert tokenizer.eos_token_id in smollm_llm.source.config.eos_token_ids
    assert tokenizer.decode(chat.outputs[0].token_ids, skip_special_tokens=True) == chat.outputs[0].text
    assert chat.prompt == text, "vLLM's prompt of a chat result: the rendered conversation"
    assert (tokenizer.model_max_length, tokenizer.name_or_path) == (smollm_llm.max_context_length,
                                                                    smollm_llm.config.model)
    # transformers 5's apply_chat_template(tokenize=True) gives an encoding, not ids: it is one prompt, those ids
    encoding = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    [from_encoding] = smollm_llm.generate(encoding, params)
    assert from_encoding.prompt_token_ids == chat.prompt_token_ids
    assert smollm_llm.generate([{"prompt_token_ids": chat.prompt_token_ids}], params)[0].outputs[0].token_ids == \
        chat.outputs[0].token_ids


def test_an_operators_chat_template_and_generation_config_reach_llm(tmp_path) -> None:
    """LLM(chat_template=...) as vLLM's --chat-template: LLM.chat and get_tokenizer() render with it.
    LLM(generation_config=folder): generate without SamplingParams samples with its values, as vLLM's does."""
    from sfllm import LLM
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.0, "top_k": 5, "max_new_tokens": 3}')
    llm = LLM(dtype="float32", device="cpu", chat_template=str(path), generation_config=str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    result = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert result.prompt == "<user>hi<assistant>" and result.prompt_token_ids == llm.tokenizer.encode(result.prompt)
    assert llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        result.prompt
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.max_tokens, defaults.top_p) == (0.0, 5, 3, 1.0)
    assert len(llm.generate(PROMPT)[0].outputs[0].token_ids) == 3
    assert len(llm.chat(messages)[0].outputs[0].token_ids) == 3
    assert len(llm.generate(PROMPT, SamplingParams(max_tokens=4))[0].outputs[0].token_ids) == 4, "given params stand"


def test_offline_mistakes_are_value_errors_naming_what_is_wrong(smollm_llm, monkeypatch) -> None:
    """As vLLM raises them: a prompt the engine refuses, a priority list of another length than the prompts', an
    allowed token that can only end an output held open by min_tokens (token 0 came out); LLM.chat hands its tools
    to the template."""
    with pytest.raises(ValueError, match="the prompt is empty"):
        smollm_llm.generate([[]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="3 priorities for 2 prompts"):
        smollm_llm.generate([PROMPT, PROMPT], SamplingParams(max_tokens=1), priority=[0, 1, 2])
    for priority in (True, "urgent", [0, 1.5]):
        with pytest.raises(ValueError, match="an integer"):
            smollm_llm.generate([PROMPT, PROMPT], SamplingParams(max_tokens=1), priority=priority)
    eos = smollm_llm.engine.worker.info.eos_token_ids[0]
    with pytest.raises(ValueError, match="every token of allowed_token_ids ends the output"):
        smollm_llm.generate(PROMPT, SamplingParams(max_tokens=4, min_tokens=2, allowed_token_ids=[eos]))
    seen = []
    render = smollm_llm.tokenizer.apply_chat_template
    monkeypatch.setattr(smollm_llm.tokenizer, "apply_chat_template",
                        lambda messages, add, tools, *rest: seen.append(tools) or render(messages, add, tools, *rest))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    smollm_llm.chat([{"role": "user", "content": "Weather?"}], SamplingParams(max_tokens=1), tools=[tool])
    assert seen == [[tool]]
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]


def test_priority_is_a_class_or_vllms_integer_for_every_prompt_or_each(smollm_llm, monkeypatch) -> None:
    """vLLM's `priority=[...]`, one integer a prompt, lower earlier: below 0 high, 0 normal, above 0 background."""
    sent = []
    add_request = smollm_llm.engine.add_request
    monkeypatch.setattr(smollm_llm.engine, "add_request", lambda request: sent.append(request) or add_request(request))
    params = SamplingParams(max_tokens=1, n=2)
    smollm_llm.generate([PROMPT] * 3, params, priority=[-1, 0, 5])
    smollm_llm.chat([{"role": "user", "content": "Hi"}], params, priority=-2)
    smollm_llm.generate(PROMPT, params, priority=None)
    smollm_llm.generate(PROMPT, params, priority="background")
    assert [request.priority for request in sent] == ["high"] * 2 + ["normal"] * 2 + ["background"] * 2 + [
        "high"] * 2 + ["normal"] * 2 + ["background"] * 2


def test_prompt_longer_than_the_context_names_the_numbers(smollm_llm) -> None:
    prompt = [100] * (smollm_llm.max_context_length + 5)
    with pytest.raises(GenerationError, match=str(smollm_llm.max_context_length)):
        smollm_llm.generate([prompt], SamplingParams(max_tokens=1))
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]


@pytest.mark.parametrize("token_id", [49152, 10**8, -1])
def test_a_token_id_outside_the_vocabulary_is_refused_and_the_llm_serves_on(smollm_llm, token_id: int) -> None:
    """Past the vocabulary the embedding would fail in the worker's step, and a negative id would wrap around."""
    with pytest.raises(GenerationError, match=f"token id {token_id}, outside the vocabulary"):
        smollm_llm.generate([[5, token_id]], SamplingParams(max_tokens=2))
    assert smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=2))[0].outputs[0].token_ids
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]


@pytest.mark.parametrize("where", ["between steps", "in the worker's wait for a result"])
def test_a_generate_stopped_midway_leaves_nothing_running(smollm_llm, monkeypatch, where: str) -> None:
    """The caller's Ctrl-C (or any error) inside generate: its requests are aborted, so the next call runs at once.
    On a GPU it most often lands in the worker's wait for a step's copy, which must leave that step to be asked for
    again."""
    from sfllm.worker.pending_step import PendingStep
    calls = []

    def interrupt_third(original):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return original(*args, **kwargs)
        return call

    if where == "between steps":
        monkeypatch.setattr(smollm_llm.engine, "step", interrupt_third(smollm_llm.engine.step))
    else:
        monkeypatch.setattr(PendingStep, "result", interrupt_third(PendingStep.result))
    with pytest.raises(KeyboardInterrupt) as interrupted:
        smollm_llm.generate([PROMPT] * 3, SamplingParams(max_tokens=500, ignore_eos=True))
    assert not getattr(interrupted.value, "__notes__", None), "the engine drained without a second error"
    monkeypatch.undo()
    assert not smollm_llm.engine.has_work()
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]
    assert len(smollm_llm.generate(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3


def test_vllm_prompt_forms_and_a_single_stop_string(smollm_llm) -> None:
    """vLLM's prompt dicts, and `stop` given as one string (not a list of its characters)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ids = smollm_llm.tokenizer.encode(PROMPT)
    by_text, by_ids, by_dicts = (smollm_llm.generate(PROMPT, greedy), smollm_llm.generate([ids], greedy),
                                 smollm_llm.generate([{"prompt": PROMPT}, {"prompt_token_ids": ids}], greedy))
    expected = by_text[0].outputs[0].token_ids
    assert by_ids[0].outputs[0].token_ids == expected
    assert [r.outputs[0].token_ids for r in by_dicts] == [expected, expected]
    with pytest.raises(ValueError, match="'prompt' or 'prompt_token_ids'"):
        smollm_llm.generate({"text": PROMPT}, greedy)
    full = smollm_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0].text
    stopped = smollm_llm.generate("1, 2, 3, 4,", SamplingParams(temperature=0.0, max_tokens=12, stop=" 7"))
    assert " 7" in full and stopped[0].outputs[0].text == full[:full.index(" 7")]


def test_chat_takes_text_content_parts_as_the_server_does(smollm_llm) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    joined = smollm_llm.chat([{"role": "user", "content": "What is 2+2?\nAnswer briefly."}], greedy)
    parts = smollm_llm.chat([{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"},
                                                          {"type": "text", "text": "Answer briefly."}]}], greedy)
    assert parts[0].prompt_token_ids == joined[0].prompt_token_ids
    assert parts[0].outputs[0].token_ids == joined[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="text only"):
        smollm_llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], greedy)


def test_triton_backend_on_cpu_without_the_interpreter_is_refused(monkeypatch) -> None:
    import torch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="torch backend"):
        resolve_backend_name("triton", torch.device("cpu"))
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"


# ---- structured outputs, logit bias ----------------------------------------------------------------------

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
QUESTIONS = ["Describe a person as JSON.", "Give me JSON about Bob, who is 42.", "Hello!", "Who wrote Hamlet?"]


def chats(llm) -> list[list[int]]:
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]


def test_json_schema_outputs_validate_and_unconstrained_rows_are_unchanged(smollm_llm) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    prompts = chats(smollm_llm)
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = [r.outputs[0].token_ids for r in smollm_llm.generate(prompts, plain)]
    constrained = SamplingParams(temperature=0.0, max_tokens=60, structured_output=StructuredOutput.json_schema(PERSON))
    sampled = msgspec.structs.replace(constrained, temperature=0.9, seed=3)
    results = smollm_llm.generate(prompts * 3, [plain] * 4 + [constrained] * 4 + [sampled] * 4)
    assert [r.outputs[0].token_ids for r in results[:4]] == alone, "a grammar in the batch changes no other row"
    for result in results[4:]:
        output = result.outputs[0]
        assert output.finish_reason == "stop", output.text
        jsonschema.validate(json.loads(output.text), PERSON)
    free, total = smollm_llm.kv_usage()
    assert free == total


def test_a_one_of_schema_is_followed_as_any_of(smollm_llm) -> None:
    """Pydantic writes `oneOf` for unions; branches llguidance cannot prove exclusive are taken as `anyOf`."""
    jsonschema = pytest.importorskip("jsonschema")
    pet = {"oneOf": [{"type": "object", "properties": {"cat": {"type": "string", "maxLength": 10}},
                      "required": ["cat"], "additionalProperties": False},
                     {"type": "object", "properties": {"dog": {"type": "integer"}}, "required": ["dog"],
                      "additionalProperties": False}]}
    params = SamplingParams(temperature=0.0, max_tokens=30, structured_output=StructuredOutput.json_schema(pet))
    output = smollm_llm.generate(chats(smollm_llm)[:1], params)[0].outputs[0]
    assert output.finish_reason == "stop", output.text
    jsonschema.validate(json.loads(output.text), pet)


def test_regex_and_grammar_constrain_the_text(smollm_llm) -> None:
    regex = SamplingParams(temperature=0.9, seed=5, max_tokens=20, structured_output=StructuredOutput.regex(r"(yes|no)\."))
    grammar = SamplingParams(temperature=0.9, seed=5, max_tokens=20,
                             structured_output=StructuredOutput.grammar('root ::= "The answer is " [0-9] [0-9]? "."'))
    for result in smollm_llm.generate(["Is the sky blue?"] * 3, regex):
        assert re.fullmatch(r"(yes|no)\.", result.outputs[0].text)
    for result in smollm_llm.generate(["What is 7 times 8?"] * 3, grammar):
        assert re.fullmatch(r"The answer is [0-9]{1,2}\.", result.outputs[0].text)


def test_vllms_structured_outputs_params_constrain_offline(smollm_llm) -> None:
    """vLLM's `SamplingParams(structured_outputs=StructuredOutputsParams(...))`: a choice, a schema as JSON text;
    none set, two set, or both spellings at once are errors naming the field."""
    choice = SamplingParams(temperature=0.9, seed=3, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=["Paris", "Lyon (a city)"]))
    assert choice.structured_output == StructuredOutput.regex(r"Paris|Lyon \(a city\)")
    assert choice.structured_outputs is None, "read into structured_output, so the engine sees one field"
    for result in smollm_llm.generate(["The capital of France is"] * 3, choice):
        assert result.outputs[0].text in ("Paris", "Lyon (a city)") and result.outputs[0].finish_reason == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    as_text = SamplingParams(temperature=0.0, max_tokens=20,
                             structured_outputs=StructuredOutputsParams(json=json.dumps(schema)))
    output = smollm_llm.generate(["Give a number as JSON."], as_text)[0].outputs[0]
    assert output.finish_reason == "stop" and isinstance(json.loads(output.text)["n"], int)
    for wrong, message in (({}, "sets no constraint"), ({"choice": "yes"}, "non-empty list of strings"),
                           ({"json": {}, "structural_tag": "{}"}, "structural tag's triggers")):
        with pytest.raises(InvalidSamplingParams, match=message) as error:
            StructuredOutputsParams(**wrong)  # refused where it is made, as vLLM refuses it
        assert error.value.param == "structured_outputs"
    with pytest.raises(InvalidSamplingParams, match="more than one"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a", grammar='root ::= "a"'))
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_output=StructuredOutput.json_object(),
                       structured_outputs=StructuredOutputsParams(json_object=True))


def test_a_structural_tag_binds_what_follows_each_trigger_offline(smollm_llm) -> None:
    """vLLM's `StructuredOutputsParams(structural_tag=...)`: free text, and after each trigger the structure's
    schema and end. The trigger is a word the answer writes (" is"), so the structure is sure to be opened."""
    city = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    tag = {"structures": [{"begin": " is", "schema": city, "end": "."}], "triggers": [" is"]}
    params = SamplingParams(temperature=0.0, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(structural_tag=json.dumps(tag)))
    [result] = smollm_llm.chat([{"role": "user", "content": "What is the capital of France?"}], params)
    calls = structures_after(result.outputs[0].text, " is", ".")
    assert calls and all(isinstance(call["city"], str) for call in calls), result.outputs[0].text


def structures_after(text: str, trigger: str, end: str) -> list[Any]:
    """The JSON value after each `trigger` in `text`, each checked to be followed by `end`."""
    values, start = [], text.find(trigger)
    while start >= 0:
        value, stop = json.JSONDecoder().raw_decode(text, start + len(trigger))
        assert text.startswith(end, stop), text
        values.append(value)
        start = text.find(trigger, stop + len(end))
    return values


def test_a_prompts_cache_salt_shares_cached_prefixes_only_within_its_salt(smollm_llm) -> None:
    """vLLM's `{"prompt": ..., "cache_salt": ...}`: a prompt run under one salt is cached for that salt alone."""
    prompt = "Salted prefixes: " + " ".join(f"w{i}" for i in range(60))
    params = SamplingParams(temperature=0.0, max_tokens=1)

    def cached(**salt: str) -> int:
        return smollm_llm.generate({"prompt": prompt, **salt}, params)[0].num_cached_tokens

    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-a") >= 32, "the same salt: the prefix is reused"
    assert cached(cache_salt="tenant-b") == 0 and cached() == 0, "another salt, or none: computed anew"
    with pytest.raises(ValueError, match="cache_salt is a non-empty string"):
        smollm_llm.generate({"prompt": prompt, "cache_salt": ""}, params)


def test_a_grammar_that_cannot_finish_ends_by_length(smollm_llm) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=5, structured_output=StructuredOutput.regex("a{50}"))
    output = smollm_llm.generate(PROMPT, params)[0].outputs[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 5 and set(output.text) == {"a"}


def test_invalid_grammar_is_refused(smollm_llm) -> None:
    with pytest.raises(InvalidSamplingParams, match="regex"):
        smollm_llm.generate(PROMPT, SamplingParams(structured_output=StructuredOutput.regex("[a-z")))
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]


def test_logit_bias_moves_the_draw(smollm_llm) -> None:
    greedy = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    first = greedy.outputs[0].token_ids[0]
    banned = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                        logit_bias={first: -100.0}))[0]
    assert banned.outputs[0].token_ids[0] != first
    forced = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.8, max_tokens=4, ignore_eos=True,
                                                        logit_bias={1234: 100.0}))[0]
    assert forced.outputs[0].token_ids == [1234] * 4
    with pytest.raises(InvalidSamplingParams) as error:
        smollm_llm.generate(PROMPT, SamplingParams(logit_bias={10**6: 1.0}))
    assert error.value.param == "logit_bias"


def test_allowed_token_ids_hold_the_draw_to_their_tokens(smollm_llm) -> None:
    """Greedy keeps to the allowed tokens, beside an unrestricted row of the same batch that keeps its own; sixteen
    samples of a first token draw among the allowed only, and not always the same; an empty set or an id outside
    the vocabulary is refused."""
    greedy = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    first = greedy.outputs[0].token_ids[0]
    allowed = [first + 1, 4321, 77, 1234]
    restricted, plain, sampled = smollm_llm.generate([PROMPT] * 3, [
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, allowed_token_ids=allowed),
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        SamplingParams(n=16, temperature=2.0, max_tokens=1, allowed_token_ids=allowed[1:])])
    assert set(restricted.outputs[0].token_ids) <= set(allowed)
    assert plain.outputs[0].token_ids == greedy.outputs[0].token_ids, "the row beside keeps its tokens"
    drawn = [output.token_ids[0] for output in sampled.outputs]
    assert set(drawn) <= set(allowed[1:]) and len(set(drawn)) > 1, drawn
    for bad in ([], [10**6]):
        with pytest.raises(InvalidSamplingParams) as error:
            smollm_llm.generate(PROMPT, SamplingParams(allowed_token_ids=bad))
        assert error.value.param == "allowed_token_ids"
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]


def test_bad_words_keep_their_tokens_out(smollm_llm) -> None:
    """A sequence of two tokens bans its second only after its first (the greedy answer's first two tokens: the
    first stays, the second goes); a word bans itself as the tokenizer writes it, after a space or not; a row
    beside keeps its tokens; a word that is blank, a string for a list, one with a structured output, and
    allowed tokens all banned are refused."""
    plain_params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    greedy = smollm_llm.generate(PROMPT, plain_params)[0].outputs[0]
    first, second = greedy.token_ids[:2]
    pair = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                      bad_words_token_ids=[[first, second]]))[0].outputs[0]
    assert pair.token_ids[0] == first and pair.token_ids[1] != second
    elsewhere = smollm_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                           bad_words_token_ids=[[first + 1, second]]))[0].outputs[0]
    assert elsewhere.token_ids == greedy.token_ids, "after another token the second is free"
    word = greedy.text.split()[0]
    banned, plain = smollm_llm.generate([PROMPT] * 2, [
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, bad_words=[word]), plain_params])
    assert plain.outputs[0].token_ids == greedy.token_ids
    tokens = banned.outputs[0].token_ids
    for spelled in (word, " " + word):
        ids = smollm_llm.tokenizer.encode_text(spelled)
        assert not any(tokens[i:i + len(ids)] == ids for i in range(len(tokens))), (spelled, ids, tokens)
    assert tokens != greedy.token_ids
    for bad, param in ((SamplingParams(bad_words=[" "]), "bad_words"), (SamplingParams(bad_words="x"), "bad_words"),
                       (SamplingParams(bad_words=["x"], structured_output=StructuredOutput.regex("[a-z]+")),
                        "bad_words"),
                       (SamplingParams(allowed_token_ids=[first], bad_words_token_ids=[[first]]), "allowed_token_ids")):
        with pytest.raises(InvalidSamplingParams) as error:
            smollm_llm.generate(PROMPT, bad)
        assert error.value.param == param
    assert smollm_llm.kv_usage()[0] == smollm_llm.kv_usage()[1]


def test_grammar_state_and_bad_words_survive_preemption(smollm_llm) -> None:
    """A pool too small for the batch preempts constrained requests mid-answer; they resume where their
    grammar stood and answer what a roomy pool answers. So do requests banning every pair of tokens of their
    plain answers: a resumed request's new slot gets its output so far, or a pair split by the preemption
    would pass (2 did when it did not)."""
    from sfllm import LLM
    prompts = chats(smollm_llm)[:3] * 2
    params = SamplingParams(temperature=0.0, max_tokens=32, structured_output=StructuredOutput.json_schema(PERSON))
    expected = [r.outputs[0].text for r in smollm_llm.generate(prompts, params)]
    for text in expected:
        json.loads(text)
    plain = smollm_llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    pairs = sorted({(a, b) for r in plain for a, b in zip(r.outputs[0].token_ids, r.outputs[0].token_ids[1:])})
    banning = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                             bad_words_token_ids=[list(pair) for pair in pairs])
    unbanned = [r.outputs[0].token_ids for r in smollm_llm.generate(prompts, banning)]
    assert not any(pair in pairs for tokens in unbanned for pair in zip(tokens, tokens[1:]))
    for mode in ("recompute", "swap"):
        small = LLM(dtype="float32", device="cpu", max_context_length=128, num_kv_blocks=8, block_size=16,
                    preemption_mode=mode, cpu_kv_cache_gib=0.01)
        results = small.generate(prompts, params)
        assert small.engine.scheduler.num_preemptions > 0, mode
        assert [r.outputs[0].text for r in results] == expected, mode
        if mode == "recompute":  # the slot's history is sent the same way in both modes
            preempted = small.engine.scheduler.num_preemptions
            results = small.generate(prompts, banning)
            assert small.engine.scheduler.num_preemptions > preempted
            assert [r.outputs[0].token_ids for r in results] == unbanned


def test_a_prompt_of_token_ids_is_taken_as_ints_numpys_too_and_bools_refused() -> None:
    import numpy as np

    from sfllm.llm import _prompt_of
    ids = [1, 2, 3]
    assert _prompt_of(ids) is ids and _prompt_of({"prompt_token_ids": ids}) is ids, "plain ints: not copied"
    converted = _prompt_of(list(np.array([4, 5], dtype=np.int64)))
    assert converted == [4, 5] and all(type(t) is int for t in converted)
    with pytest.raises(TypeError):
        _prompt_of([1, True])
    with pytest.raises(TypeError):
        _prompt_of([1, 2.0])
