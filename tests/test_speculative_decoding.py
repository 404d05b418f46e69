"""Speculative decoding (n-gram drafts) without a model: the proposer, the verify rule, the sampler's
distribution at draft positions, and the scheduler's drafts, rollback and block accounting against a fake
worker whose "model" repeats itself (so drafts are often right and sometimes wrong)."""
from __future__ import annotations

import random
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_scheduler_policies import (FakeWorker, add, assert_all_free, drain, make_engine, make_scheduler,
                                     prompt_of, run_random_workload, step_once)

from sfllm.config import ConfigError, ServerConfig, load_config
from sfllm.messages import ForwardBatch, ForwardResult, SampledLogprobs
from sfllm.sampling_params import SamplingParams
from sfllm.scheduler import speculation as speculation_module
from sfllm.scheduler.draft_proposer import NgramProposer
from sfllm.engine.engine_process import EngineCounters, EngineServer
from sfllm.worker.pending_step import verify_drafts
from sfllm.worker.sampler import Sampler, SamplingInputs

SPEC = {"speculative_method": "ngram", "num_speculative_tokens": 3, "speculative_ngram_min": 1,
        "speculative_ngram_max": 3, "speculative_min_acceptance_rate": 0.0}


# ---- the proposer -----------------------------------------------------------------------------

def test_ngram_proposer_continues_the_latest_match_of_the_longest_suffix() -> None:
    proposer = NgramProposer(1, 3)
    #         0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    assert proposer.propose(tokens, 2) == [9, 2], "the latest occurrence of (6, 7)"
    assert proposer.propose(tokens + [9], 3) == [2, 6, 7], "(6, 7, 9) beats a shorter match"
    assert proposer.propose([1, 2, 3, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1], "past the end: period 3 repeats"
    assert proposer.propose([1, 2, 3, 4], 4) == [], "no earlier occurrence"
    assert proposer.propose([4, 4], 3) == [4, 4, 4], "a run of one token"
    assert proposer.propose([7, 1, 2, 1, 2], 4) == [1, 2, 1, 2]
    assert proposer.propose(tokens, 0) == []
    assert NgramProposer(2, 3).propose([1, 2, 3, 9, 3], 2) == [], "a one-token match is below min_n"
    assert NgramProposer(2, 3).propose([3, 9, 2, 3, 9], 2) == [2, 3]
    with pytest.raises(ValueError):
        NgramProposer(3, 2)


def test_ngram_proposer_is_cheap_on_a_long_context() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, 32_000).tolist()
    tokens += tokens[1000:1004]
    assert NgramProposer(1, 4).propose(tokens, 3) == tokens[1004:1007]


def test_config_names_and_checks_the_speculation_keys(tmp_path) -> None:
    config = load_config(environ={"SFLLM_SPECULATIVE_METHOD": "ngram", "SFLLM_NUM_SPECULATIVE_TOKENS": "5"})
    assert config.speculative_method == "ngram" and config.num_speculative_tokens == 5
    assert ServerConfig().speculative_method is None, "off by default"
    profile = tmp_path / "profile.yaml"
    profile.write_text("speculative_method: ngram\nspeculative_ngram_min: 1\nspeculative_ngram_max: 5\n")
    config = load_config(type("Args", (), {"config": str(profile)})(), environ={})
    assert (config.speculative_ngram_min, config.speculative_ngram_max) == (1, 5)
    for bad in ({"speculative_method": "eagle"}, {"num_speculative_tokens": 0},
                {"speculative_ngram_min": 4, "speculative_ngram_max": 3}, {"speculative_min_acceptance_rate": 2.0}):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)


# ---- the verify rule and the sampler at draft positions ----------------------------------------

def test_verify_keeps_drafts_up_to_the_first_difference_and_the_target_token_there() -> None:
    # sequence a: 2 drafts, both equal to the draws (bonus token 30); b: first draft differs; c: no drafts
    rows = [10, 20, 30, 11, 99, 13, 12]
    row_logprobs = [SampledLogprobs(-0.1 * row, []) for row in range(7)]
    last, logprobs, emitted, emitted_logprobs = verify_drafts(rows, row_logprobs, [[10, 20], [5, 12], []])
    assert emitted == [[10, 20, 30], [11], [12]]
    assert last == [30, 11, 12]
    assert emitted_logprobs == [row_logprobs[0:3], row_logprobs[3:4], row_logprobs[6:7]], "each emitted row's"
    assert logprobs == [row_logprobs[0], row_logprobs[3], row_logprobs[6]]


def test_rejection_sampling_of_a_point_mass_draft_preserves_the_target_distribution() -> None:
    """Rows drawn as the worker draws a speculating sequence's positions (one sampler call, the draft's position
    and the one after it), then verified: the first emitted token follows p, the draft survives with
    probability p(d), a rejected draft is replaced by p without d renormalised, and the token after an
    accepted draft follows that position's own distribution q."""
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    q = torch.tensor([0.3, 0.1, 0.2, 0.2, 0.2])
    draft = 1
    num = 40_000
    logits = torch.stack([p.log(), q.log()] * num)
    inputs = SamplingInputs.build([SamplingParams(temperature=1.0)] * (2 * num), list(range(2 * num)), 5,
                                  torch.device("cpu"))
    draws = Sampler(seed=3)(logits, inputs).token_ids.tolist()
    _, _, emitted, _ = verify_drafts(draws, [None] * len(draws), [[draft]] * num)
    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=5).float() / num
    accepted = [e for e in emitted if len(e) == 2]
    rejected = torch.bincount(torch.tensor([e[0] for e in emitted if len(e) == 1]), minlength=5).float()
    after = torch.bincount(torch.tensor([e[1] for e in accepted]), minlength=5).float() / len(accepted)
    without_draft = p.clone()
    without_draft[draft] = 0
    # 4 standard errors at most, for each frequency
    def close(frequencies: torch.Tensor, expected: torch.Tensor, count: int) -> bool:
        return bool(((frequencies - expected).abs() <= 4 * (expected * (1 - expected) / count).sqrt() + 1e-9).all())

    assert close(first, p, num)
    assert abs(len(accepted) / num - p[draft].item()) <= 4 * (0.4 * 0.6 / num) ** 0.5
    assert rejected[draft] == 0
    assert close(rejected / rejected.sum(), without_draft / without_draft.sum(), int(rejected.sum()))
    assert close(after, q, len(accepted))


# ---- the scheduler against a fake worker that verifies drafts ----------------------------------

def repeating_token(context: tuple[int, ...]) -> int:
    """Mostly the token 7 back (a loop that n-gram drafts catch), now and then a fresh one."""
    digest = zlib.crc32(repr(context).encode())
    if len(context) >= 7 and digest % 4:
        return context[-7]
    return digest % 50_000 + 3


def expected_outputs(prompt: list[int], max_tokens: int, stop: list[int]) -> tuple[list[int], str]:
    sequence = list(prompt)
    for _ in range(max_tokens):
        sequence.append(repeating_token(tuple(sequence)))
        if sequence[-1] in stop:
            return sequence[len(prompt):], "stop"
    return sequence[len(prompt):], "length"


class VerifyingFakeWorker(FakeWorker):
    """FakeWorker whose sequences with drafts sample every draft position and keep the drafts up to the
    first that differs from the sampled token."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_draft_rows = 0

    def submit(self, batch: ForwardBatch) -> None:
        super().submit(batch)  # writes every input token (drafts too) into the pool; samples the last positions
        result = self._results.pop()
        drafts = batch.num_draft_tokens or [0] * len(batch.slots)
        tables = [self.tables[slot] for slot in batch.slots]
        size = self.block_size
        ends = np.cumsum(batch.num_new_tokens)
        last, accepted = [], []
        for slot, end, table, sample, k, input_end in zip(batch.slots, batch.context_lens, tables, batch.sample,
                                                           drafts, ends):
            if not sample:
                continue
            self.num_draft_rows += k
            draft = batch.input_token_ids[input_end - k:input_end]
            emitted = []
            for i in range(k + 1):
                context = tuple(self.pool[table[p // size]][p % size] for p in range(end - k + i))
                emitted.append(repeating_token(context))
                if i == k or emitted[-1] != draft[i]:
                    break
            self.last_tokens[slot] = emitted[-1]
            last.append(emitted[-1])
            accepted.append(emitted)
        drafted = bool(batch.num_draft_tokens)
        self._results.append(ForwardResult(step_id=batch.step_id, token_ids=last, logprobs=[None] * len(last),
                                           accepted_token_ids=accepted if drafted else [],
                                           accepted_logprobs=[[None] * len(e) for e in accepted] if drafted else []))


def spec_engine(**kwargs):
    core, clock = make_engine(**(SPEC | kwargs))
    worker = VerifyingFakeWorker(core.scheduler.allocator.num_blocks, core.scheduler.block_size,
                                 core.scheduler.max_context_length, core.scheduler.swap_space.num_blocks)
    core.worker = worker
    return core, clock, worker


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_random_workload_with_drafts_gives_the_exact_outputs_and_frees_every_block(preemption_mode: str) -> None:
    """Priorities, chunked prefill, preemption, stop tokens, max_tokens, the context limit and aborts on a pool
    of 16 blocks of 4 tokens, with two steps in flight where no draft waits for one."""
    for seed in range(3):
        rng = random.Random(seed)
        core, clock, worker = spec_engine(num_blocks=16, block_size=4, max_context_length=48, num_cpu_blocks=8,
                                          max_running_tokens=rng.choice([8, 16, 64]), max_running_requests=5,
                                          preemption_mode=preemption_mode, max_background_wait_s=2.0)
        scheduler = core.scheduler
        expected, pending = {}, []
        for i in range(20):
            prompt = [rng.randrange(10, 40) for _ in range(rng.randint(1, 14))]
            max_tokens = rng.randint(1, 60 - len(prompt))
            want, _ = expected_outputs(prompt, min(max_tokens, 48 - len(prompt)), [])
            stop = [rng.choice(want)] if rng.random() < 0.3 else []
            expected[f"r{i}"] = expected_outputs(prompt, min(max_tokens, 48 - len(prompt)), stop)
            pending.append((f"r{i}", prompt, max_tokens, rng.choice(["high", "normal", "background"]), stop))
        run_random_workload(core, clock, rng, pending, expected, abort_rate=0.02, seed=seed)
        spec = scheduler.speculation
        assert 0 < spec.num_accepted < spec.num_proposed, "drafts accepted and rejected"
        # drafts of requests aborted while their step was in flight are not counted
        assert worker.num_draft_rows - 20 <= spec.num_proposed <= worker.num_draft_rows
        assert scheduler.num_preemptions > 0, "the pool is small enough to force preemption"


class OracleProposer:
    """Drafts the fake model's own continuation: every draft is accepted."""

    def propose(self, tokens: list[int], max_drafts: int) -> list[int]:
        sequence = list(tokens)
        for _ in range(max_drafts):
            sequence.append(repeating_token(tuple(sequence)))
        return sequence[len(tokens):]


class WrongProposer:
    def propose(self, tokens: list[int], max_drafts: int) -> list[int]:
        return [0] * max_drafts  # the fake model never samples 0


def test_rejected_drafts_give_back_their_blocks_and_the_request_continues_after_its_accepted_tokens() -> None:
    scheduler, _, _ = make_scheduler(block_size=4, **SPEC)
    worker = VerifyingFakeWorker(64, 4, 64)
    add(scheduler, "a", prompt_of(13), max_tokens=30)
    step_once(scheduler, worker)  # the prefill
    request = scheduler.requests["a"]
    scheduler.speculation.proposer = OracleProposer()
    step, outputs = step_once(scheduler, worker)
    assert step.batch.num_draft_tokens == [3] and step.batch.num_new_tokens == [4]
    assert len(outputs[0].token_ids) == 4, "three drafts and the token after them"
    assert request.num_computed_tokens == request.num_tokens - 1 == 17, "the last emitted token's KV is not computed"
    assert len(request.block_ids) == 5
    scheduler.speculation.proposer = WrongProposer()
    step, outputs = step_once(scheduler, worker)  # KV of positions 17..20 written, 18..20 rejected
    assert step.batch.context_lens == [21] and len(outputs[0].token_ids) == 1
    assert request.num_computed_tokens == 18
    assert len(request.block_ids) == 5, "the sixth block, of rejected drafts alone, is free again"
    assert request.num_blocks_sent == 5
    assert scheduler.allocator.num_free == 64 - 5
    assert request.output_token_ids == expected_outputs(prompt_of(13), 6, [])[0]
    scheduler.abort_requests(["a"])
    assert_all_free(scheduler)


def test_drafts_stop_at_max_tokens_and_the_context() -> None:
    """Drafts always right (the fake model's own tokens), yet a request never gets more than max_tokens, nor a
    verify row past the context."""
    scheduler, _, _ = make_scheduler(block_size=4, max_context_length=24, **SPEC)
    scheduler.speculation.proposer = OracleProposer()
    worker = VerifyingFakeWorker(64, 4, 24)
    add(scheduler, "a", prompt_of(14), max_tokens=3)
    add(scheduler, "b", prompt_of(21, start=100), max_tokens=50)  # room for 3 tokens in the context of 24
    outputs, drafts = {}, []
    for _ in range(20):
        step, outs = step_once(scheduler, worker)
        if step is None:
            break
        drafts.append(step.batch.num_draft_tokens)
        assert max(step.batch.context_lens) <= 23, "a verify row never reaches past the context"
        for out in outs:
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    assert drafts == [[], [1, 1]], "after the prefill, one draft each: two tokens left for a, the context for b"
    assert outputs == {"a": expected_outputs(prompt_of(14), 3, [])[0],
                       "b": expected_outputs(prompt_of(21, start=100), 3, [])[0]}
    assert_all_free(scheduler)


def test_speculation_turns_off_above_the_batch_size_and_for_requests_whose_drafts_fail() -> None:
    scheduler, _, _ = make_scheduler(block_size=4, **(SPEC | {"speculative_max_batch_size": 1,
                                                              "speculative_min_acceptance_rate": 0.5}))
    worker = VerifyingFakeWorker(64, 4, 64)
    add(scheduler, "a", [1, 2, 3, 4, 5, 6, 7] * 2, max_tokens=40)
    add(scheduler, "b", [8, 9, 10, 11, 12, 13, 14] * 2, max_tokens=40)
    step_once(scheduler, worker)
    step, _ = step_once(scheduler, worker)
    assert not step.batch.num_draft_tokens and not scheduler.speculation_wanted(), "two running, limit one"
    scheduler.abort_requests(["b"])
    scheduler.speculation.proposer = WrongProposer()
    drafted = 0
    for _ in range(speculation_module.WARMUP_STEPS + 4):
        step, _ = step_once(scheduler, worker)
        drafted += bool(step.batch.num_draft_tokens)
    assert drafted == speculation_module.WARMUP_STEPS, "off once its first steps' drafts were all rejected"
    assert scheduler.requests["a"].speculation_off and not scheduler.speculation_wanted()


def test_requests_with_penalties_never_speculate_and_with_logprobs_do() -> None:
    scheduler, _, _ = make_scheduler(block_size=4, **SPEC)
    scheduler.speculation.proposer = OracleProposer()
    worker = VerifyingFakeWorker(64, 4, 64)
    add(scheduler, "pen", prompt_of(14), max_tokens=10, presence_penalty=0.5)
    add(scheduler, "lp", prompt_of(14), max_tokens=10, logprobs=1)
    step_once(scheduler, worker)
    step, outputs = step_once(scheduler, worker)
    assert step.batch.num_draft_tokens == [0, 3]
    assert [len(o.token_ids) for o in outputs] == [1, 4] and len(outputs[1].logprobs) == 4
    scheduler.abort_requests(["lp", "pen"])


def test_the_engine_waits_for_a_step_with_drafts_before_sending_the_next() -> None:
    core, _, worker = spec_engine(block_size=4)
    core.scheduler.speculation.proposer = OracleProposer()
    add(core.scheduler, "a", [1, 2, 3, 4, 5, 6, 7] * 2, max_tokens=30)
    max_in_flight = 0
    while core.has_work():
        core.step()
        max_in_flight = max(max_in_flight, core.num_in_flight)
    assert max_in_flight == 1 and core.scheduler.speculation.num_accepted > 0
    assert_all_free(core.scheduler)
    # what frontends get in EngineStats (their /metrics), and the engine loop's log line
    stats = EngineServer._stats(SimpleNamespace(core=core, counters=EngineCounters()))
    speculation = core.scheduler.speculation
    assert (stats.num_spec_proposed_tokens, stats.num_spec_accepted_tokens) == \
        (speculation.num_proposed, speculation.num_accepted)
    assert core.scheduler.speculation_summary().startswith(
        f"{speculation.num_accepted}/{speculation.num_proposed} draft tokens accepted")


def test_a_request_without_matches_looks_again_only_after_a_backoff_and_keeps_the_overlap_meanwhile() -> None:
    class NoMatch:
        calls = 0

        def propose(self, tokens: list[int], max_drafts: int) -> list[int]:
            NoMatch.calls += 1
            return []

    core, _, worker = spec_engine(block_size=4)
    core.scheduler.speculation.proposer = NoMatch()
    sent_behind = []  # per step sent: whether another was in flight
    submit = worker.submit
    worker.submit = lambda batch: (sent_behind.append(core.num_in_flight > 0), submit(batch))
    add(core.scheduler, "a", prompt_of(5), max_tokens=40)
    drain(core)
    backoff = speculation_module.NO_MATCH_BACKOFF_STEPS
    assert NoMatch.calls in (40 // (backoff + 1), -(-40 // (backoff + 1))), "one look per backoff"
    assert sum(sent_behind) >= len(sent_behind) // 2, "steps overlap while the request backs off"
    assert not all(sent_behind)
    assert_all_free(core.scheduler)


def test_steps_whose_drafts_do_not_fit_in_the_free_blocks_do_not_count_against_speculation(monkeypatch) -> None:
    """Short of KV blocks a request gets fewer drafts (or none), never a judgement for slots it was not
    offered: a request whose every draft is right keeps speculating through a full pool."""
    monkeypatch.setattr(speculation_module, "WARMUP_STEPS", 4)
    scheduler, _, _ = make_scheduler(num_blocks=16, block_size=4, **(SPEC | {"speculative_min_acceptance_rate": 0.5}))
    scheduler.speculation.proposer = OracleProposer()
    worker = VerifyingFakeWorker(16, 4, 64)
    add(scheduler, "a", prompt_of(13), max_tokens=40)
    step_once(scheduler, worker)  # the prefill: 4 blocks, positions 0..15
    request = scheduler.requests["a"]
    taken = scheduler.allocator.allocate(scheduler.allocator.num_free)  # someone else's: the pool is full
    while request.num_computed_tokens < len(request.block_ids) * 4:  # its next decode fits in its own blocks
        step, _ = step_once(scheduler, worker)
        assert step.batch.context_lens[0] <= 16, "no draft past its blocks"
    scheduler.allocator.free(taken)
    for _ in range(4):
        step_once(scheduler, worker)
    assert not request.speculation_off, "every draft it was given was accepted"
    assert scheduler.speculation.num_accepted == scheduler.speculation.num_proposed > 0
    scheduler.abort_requests(["a"])
    assert_all_free(scheduler)


def test_steps_with_room_for_fewer_drafts_are_judged_by_the_slots_they_offered(monkeypatch) -> None:
    """A budget of 3 tokens leaves a decode room for 2 of its 3 drafts: a request whose every draft is right
    has accepted all it was offered, and keeps speculating at a rate over 2/3."""
    monkeypatch.setattr(speculation_module, "WARMUP_STEPS", 4)
    scheduler, _, _ = make_scheduler(max_running_tokens=3, **(SPEC | {"speculative_min_acceptance_rate": 0.8}))
    scheduler.speculation.proposer = OracleProposer()
    worker = VerifyingFakeWorker(64, 4, 64)
    add(scheduler, "a", prompt_of(6), max_tokens=40)
    request = scheduler.requests["a"]
    while request.num_spec_steps < 8 and not request.is_finished:
        step_once(scheduler, worker)
    assert request.num_spec_slots == 2 * request.num_spec_steps >= 16, "two slots a step"
    assert not request.speculation_off, "every draft it was given was accepted"
    scheduler.abort_requests(["a"])
    assert_all_free(scheduler)


def test_verify_graphs_make_room_for_high_prioritys_slots_too() -> None:
    """A verify step has at most `speculative_max_batch_size` sequences, and may have as many as run: past a low
    `max_running_requests`, with high priority's slots, it still gets a graph."""
    from sfllm.worker.cuda_graph_runner import speculative_graph_sizes
    config = ServerConfig(speculative_method="ngram", num_speculative_tokens=3, max_running_requests=4,
                          high_priority_slots=2)
    assert speculative_graph_sizes(config.worker()) == (3, 6)
    default_limits = ServerConfig(speculative_method="ngram", num_speculative_tokens=3)
    assert speculative_graph_sizes(default_limits.worker()) == (3, 32)
    assert speculative_graph_sizes(ServerConfig().worker()) == (0, 0)
