"""Rows whose draw is restricted, on a GPU, each beside plain rows of the same steps that must keep the captured
decode step's tokens: min_tokens (the eager sampler passes over -inf ending tokens), allowed_token_ids (the
request's token set in the step's staged bitmask) and bad_words (a -inf bias on the banned tokens, a sequence's
last token only after the rest)."""
from __future__ import annotations

import gc

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MIN_TOKENS = 4
PROMPTS = [[100 + i] * 8 for i in range(12)]


@pytest.fixture(scope="module")
def engine():
    """One engine for the module, in a box emptied at teardown: pytest holds a fixture's value until its
    finalizers have run, so the box, not the engine, is what it keeps, and the suite's next files (whose servers
    start in processes of their own) get the device's memory back."""
    from sfllm import LLM
    box = [LLM(model="qwen3-0.6b", load_format="dummy", cuda_graph_max_bs=16)]
    yield box
    box.clear()
    gc.collect()
    torch.cuda.empty_cache()


def _plain(llm, temperature: float) -> list[list[int]]:
    from sfllm import SamplingParams
    return [r.outputs[0].token_ids for r in llm.generate(PROMPTS, SamplingParams(
        temperature=temperature, seed=7, max_tokens=8, ignore_eos=True))]


def _beside_plain_rows(llm, temperature: float, restrict) -> list[tuple[list[int], list[int]]]:
    """Even rows under `restrict(plain tokens) -> SamplingParams fields`, odd rows plain, all in the same steps:
    asserts the odd rows kept their tokens and returns the even rows' (tokens, plain tokens)."""
    from sfllm import SamplingParams
    plain = _plain(llm, temperature)
    plain_fields = {"temperature": temperature, "seed": 7, "max_tokens": 8, "ignore_eos": True}
    params = [SamplingParams(**(plain_fields | restrict(tokens) if i % 2 == 0 else plain_fields))
              for i, tokens in enumerate(plain)]
    outputs = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, params)]
    for i in range(1, len(PROMPTS), 2):
        assert outputs[i] == plain[i], "a plain row beside restricted rows keeps its tokens"
    assert llm.kv_usage()[0] == llm.kv_usage()[1], "every KV block free again"
    return [(outputs[i], plain[i]) for i in range(0, len(PROMPTS), 2)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_short_of_min_tokens_pass_over_their_ending_tokens(engine, temperature: float) -> None:
    llm = engine[0]
    eos = set(llm.source.config.eos_token_ids)
    # a stop token each row would draw first: held off, the row draws another
    rows = _beside_plain_rows(llm, temperature, lambda tokens: {
        "min_tokens": MIN_TOKENS, "stop_token_ids": [tokens[0]], "ignore_eos": False})
    for tokens, plain in rows:
        assert len(tokens) >= MIN_TOKENS
        first = tokens[:MIN_TOKENS]
        assert plain[0] not in first and not eos & set(first)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_allowed_token_ids_hold_rows_to_their_sets(engine, temperature: float) -> None:
    def allowed(tokens: list[int]) -> list[int]:
        # tokens the row did not draw first, one of them the token after
        return sorted({tokens[0] + 1, 4321, 77, 1234} - {tokens[0]})

    rows = _beside_plain_rows(engine[0], temperature, lambda tokens: {"allowed_token_ids": allowed(tokens)})
    for tokens, plain in rows:
        assert set(tokens) <= set(allowed(plain)), (tokens, allowed(plain))


def test_bad_words_ban_a_token_and_the_end_of_a_sequence(engine) -> None:
    rows = _beside_plain_rows(engine[0], 0.0, lambda tokens: {"bad_words_token_ids": [[tokens[0]]]})
    for tokens, plain in rows:
        assert plain[0] not in tokens, (tokens, plain)
    # a pair bans its second token only right after its first: greedy keeps the first and turns off at the second
    rows = _beside_plain_rows(engine[0], 0.0, lambda tokens: {"bad_words_token_ids": [tokens[:2]]})
    for tokens, plain in rows:
        assert tokens[0] == plain[0] and tokens[1] != plain[1], (tokens, plain)
