"""Speculative decoding on the real default model (float32, CPU): the same tokens as plain decoding for greedy
and seeded requests, stops and max_tokens exact, every KV block free afterwards."""
from __future__ import annotations

import pytest

from sfllm import SamplingParams, StructuredOutput

PARAGRAPH = ("The committee met on Tuesday to review the budget. After a long discussion, the members agreed to "
             "fund the new library, repair the old bridge, and plant two hundred trees along the river.")
REPEAT = [{"role": "user", "content": f"Repeat this paragraph word for word:\n\n{PARAGRAPH}"}]


@pytest.fixture
def speculating(smollm_llm):
    """The session's LLM with n-gram speculation switched on for one test (the config only sizes CUDA graphs)."""
    speculation = smollm_llm.engine.scheduler.speculation
    speculation.enabled = True
    yield smollm_llm
    speculation.enabled = False


def run(llm, speculate: bool, conversations, params: SamplingParams):
    llm.engine.scheduler.speculation.enabled = speculate
    try:
        return [r.outputs[0] for r in llm.chat(conversations, params)]
    finally:
        llm.engine.scheduler.speculation.enabled = True


def test_greedy_and_seeded_outputs_equal_plain_decoding(speculating) -> None:
    """The greedy batch's first request asks for logprobs (each accepted draft's are its row's); the second
    follows a grammar: it does not draft, and its grammar row comes after the drafting request's rows of the
    step (the mask's rows count every draft position)."""
    conversations = [REPEAT, [{"role": "user", "content": "Name three colours and a fruit, as JSON."}]]
    speculation = speculating.engine.scheduler.speculation
    json_object = SamplingParams(temperature=0.0, max_tokens=24, structured_output=StructuredOutput.json_object())
    for params in ([SamplingParams(temperature=0.0, max_tokens=32, logprobs=2), json_object],
                   SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=16)):
        accepted_before = speculation.num_accepted
        plain = run(speculating, False, conversations, params)
        drafted = run(speculating, True, conversations, params)
        assert [o.token_ids for o in drafted] == [o.token_ids for o in plain], params
        assert [o.finish_reason for o in drafted] == [o.finish_reason for o in plain]
        if isinstance(params, list):
            assert len(drafted[0].logprobs) == len(drafted[0].token_ids) == len(plain[0].logprobs)
        for ours, theirs in zip(drafted[0].logprobs or [], plain[0].logprobs or []):  # a draft row's are a decode's
            assert list(ours) == list(theirs) and [e.rank for e in ours.values()] == [e.rank for e in theirs.values()]
            assert [e.logprob for e in ours.values()] == pytest.approx([e.logprob for e in theirs.values()], abs=1e-4)
        assert speculation.num_accepted > accepted_before, "the repeated paragraph's drafts are accepted"
    free, total = speculating.kv_usage()
    assert free == total


def test_stops_and_max_tokens_end_where_plain_decoding_ends(speculating) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    full = run(speculating, False, [REPEAT], greedy)[0]
    stop_id = full.token_ids[12]
    stop_text = full.text[len(full.text) // 2:len(full.text) // 2 + 6]
    for params in (SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_id]),
                   SamplingParams(temperature=0.0, max_tokens=20, stop=[stop_text]),
                   SamplingParams(temperature=0.0, max_tokens=9)):
        plain = run(speculating, False, [REPEAT], params)[0]
        drafted = run(speculating, True, [REPEAT], params)[0]
        assert (drafted.token_ids, drafted.text, drafted.finish_reason) == \
            (plain.token_ids, plain.text, plain.finish_reason), params
    assert len(drafted.token_ids) == 9
    free, total = speculating.kv_usage()
    assert free == total


def test_a_freed_slots_step_in_flight_does_not_add_to_its_next_requests_penalty_history(smollm_llm) -> None:
    """A request aborted (or preempted) while its step is in flight frees its slot, which the next request gets
    at once; that step's tokens (a verify step's several) are the old request's, not part of the penalties the
    worker keeps for the new one."""
    from sfllm.messages import GenerateRequest
    core, runner = smollm_llm.engine, smollm_llm.engine.worker.runner
    greedy = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    core.add_request(GenerateRequest(request_id="a", prompt_token_ids=smollm_llm.tokenizer.encode("Count to fifty:"),
                                     params=greedy))
    for _ in range(6):  # decoding, a step in flight
        core.step()
    assert core.num_in_flight == 1 and core.scheduler.requests["a"].output_token_ids
    core.abort(["a"])
    penalised = SamplingParams(temperature=0.0, max_tokens=3, presence_penalty=1.5, ignore_eos=True)
    core.add_request(GenerateRequest(request_id="b", prompt_token_ids=smollm_llm.tokenizer.encode("Colours:"),
                                     params=penalised))
    histories = []
    while core.has_work():
        core.step()
        request = core.scheduler.requests.get("b")
        if request is not None and request.slot is not None:
            histories.append((runner.slots[request.slot].output_token_ids[:len(request.output_token_ids)],
                              request.output_token_ids[:]))
    assert histories and all(worker == known for worker, known in histories)
