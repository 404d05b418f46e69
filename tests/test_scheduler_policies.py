"""Scheduler policies on a simulated clock and a fake KV pool, without a model.

`FakeWorker` keeps the worker's side of the contract with token ids standing in for K/V:
a step writes its input tokens into the paged pool (resolving -1 to the slot's last
sampled token) and samples a token that hashes the whole context read back from the
pool. A block shared, swapped, reused or freed too early therefore changes the output,
which `expected_tokens` computes without any pool.
"""
from __future__ import annotations

import logging
import random
import zlib
from collections import deque
from collections.abc import Callable

import pytest

from sfllm.config import ServerConfig, num_sequence_slots
from sfllm.engine.engine_core import EngineCore
from sfllm.engine.send_timing import (RECENT_STEPS, SEND_AHEAD_FACTOR, SEND_AHEAD_MAX_S, SEND_AHEAD_MIN_S,
                                      SEND_AHEAD_SLACK_S, SendTiming)
from sfllm.messages import PROTOCOL_VERSION, ForwardBatch, ForwardResult, GenerateRequest, RequestOutput, WorkerReady
from sfllm.sampling_params import SamplingParams
from sfllm.scheduler.block_allocator import BlockAllocator
from sfllm.scheduler.length_buckets import order_by_length_bucket
from sfllm.scheduler.preemption import choose_victim, may_push_out
from sfllm.scheduler.priority import split_slots
from sfllm.scheduler.request import Request
from sfllm.scheduler.scheduler import HIGH_PRIORITY_LATELY_S, ScheduledStep, Scheduler
from sfllm.scheduler.waiting_queue import WaitingQueue

EOS = 2
VOCAB = 50_003


def next_token(context: tuple[int, ...]) -> int:
    return zlib.crc32(repr(context).encode()) % 50_000 + 3


def expected_tokens(prompt: list[int], max_tokens: int) -> list[int]:
    sequence = list(prompt)
    for _ in range(max_tokens):
        sequence.append(next_token(tuple(sequence)))
    return sequence[len(prompt):]


def unending_token(context: tuple[int, ...], banned: list[int]) -> int:
    """The fake model's token where its request is short of min_tokens: the next one not banned."""
    token = next_token(context)
    while token in banned:
        token += 1
    return token


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeWorker:
    in_own_process = False

    def __init__(self, num_blocks: int, block_size: int, max_context_length: int, num_cpu_blocks: int = 0) -> None:
        self.info = WorkerReady(protocol_version=PROTOCOL_VERSION, model_name="fake",
                                max_context_length=max_context_length, eos_token_ids=[EOS],
                                num_kv_blocks=num_blocks, num_cpu_kv_blocks=num_cpu_blocks,
                                block_size=block_size, vocab_size=VOCAB, pid=0)
        self.block_size = block_size
        self.pool: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.cpu_pool: list[list[int | None]] = [[None] * block_size for _ in range(num_cpu_blocks)]
        self.last_tokens: dict[int, int] = {}
        self.params: dict[int, SamplingParams] = {}  # by slot, from the steps' new sequences
        self.tables: dict[int, list[int]] = {}  # by slot, kept from the steps' block table updates
        self.batches: list[ForwardBatch] = []
        self._results: deque[ForwardResult] = deque()

    def submit(self, batch: ForwardBatch) -> None:
        self.batches.append(batch)
        for gpu, cpu in batch.swap_out:
            self.cpu_pool[cpu] = list(self.pool[gpu])
        for cpu, gpu in batch.swap_in:
            self.pool[gpu] = list(self.cpu_pool[cpu])
        for update in batch.block_table_updates:
            table = self.tables.setdefault(update.slot, [])
            del table[update.start:]
            assert len(table) == update.start, f"step {batch.step_id}: slot {update.slot} table has a gap"
            table.extend(update.block_ids)
        for sequence in batch.new_sequences:
            self.params[sequence.slot] = sequence.params
        unending = set(batch.min_tokens_rows)
        tables = [self.tables[slot] for slot in batch.slots]
        size = self.block_size
        inputs = iter(batch.input_token_ids)
        # every row's K/V is stored before any row attends, as in the attention backends
        for slot, num_new, end, table in zip(batch.slots, batch.num_new_tokens, batch.context_lens, tables):
            for position in range(end - num_new, end):
                token = next(inputs)
                self.pool[table[position // size]][position % size] = self.last_tokens[slot] if token < 0 else token
        sampled = []
        for slot, end, table, sample in zip(batch.slots, batch.context_lens, tables, batch.sample):
            if sample:
                context = tuple(self.pool[table[p // size]][p % size] for p in range(end))
                assert None not in context, f"step {batch.step_id} reads K/V never written"
                if len(sampled) in unending:  # as the worker masks the model's EOS and the stop tokens
                    self.last_tokens[slot] = unending_token(context, self.params[slot].stop_token_ids + [EOS])
                else:
                    self.last_tokens[slot] = next_token(context)
                sampled.append(self.last_tokens[slot])
        self._results.append(ForwardResult(step_id=batch.step_id, token_ids=sampled, logprobs=[None] * len(sampled)))

    def collect(self) -> ForwardResult:
        return self._results.popleft()


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_context_length: int = 64,
                   num_cpu_blocks: int = 0, **config) -> tuple[Scheduler, FakeWorker, FakeClock]:
    clock = FakeClock()
    worker = FakeWorker(num_blocks, block_size, max_context_length, num_cpu_blocks)
    scheduler_config = ServerConfig(block_size=block_size, **config).scheduler()
    scheduler = Scheduler(scheduler_config, num_blocks, num_cpu_blocks, max_context_length, [EOS], clock=clock)
    return scheduler, worker, clock


def make_engine(**kwargs) -> tuple[EngineCore, FakeClock]:
    """The real step pipeline (two steps in flight) over the fake worker and clock."""
    scheduler, worker, clock = make_scheduler(**kwargs)
    core = EngineCore(scheduler.config, worker)
    core.scheduler = scheduler
    return core, clock


def add(scheduler: Scheduler | EngineCore, request_id: str, prompt: list[int], max_tokens: int = 4,
        priority: str = "normal", arrival: float = 0.0, **params) -> RequestOutput | None:
    """Queues a request on the scheduler, or through the engine core."""
    return scheduler.add_request(GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt, priority=priority, arrival_time=arrival or 1.0,
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params)))


def prompt_of(length: int, start: int = 10) -> list[int]:
    return [start + i for i in range(length)]


def step_once(scheduler: Scheduler, worker: FakeWorker) -> tuple[ScheduledStep | None, list[RequestOutput]]:
    """One step without overlap: schedule, run, read back."""
    step = scheduler.schedule()
    if step is None:
        return None, []
    worker.submit(step.batch)
    return step, scheduler.process_result(step, worker.collect())


def collect_outputs(outputs: list[RequestOutput], into: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    into = {} if into is None else into
    for out in outputs:
        into.setdefault(out.request_id, []).extend(out.token_ids)
    return into


def running_ids(scheduler: Scheduler) -> list[str]:
    return [r.request_id for r in scheduler.running]


def drain(core: EngineCore, max_steps: int = 5000) -> None:
    for _ in range(max_steps):
        if not core.has_work():
            return
        core.step()
    raise AssertionError(f"the engine still has work after {max_steps} steps")


def assert_all_free(scheduler: Scheduler) -> None:
    allocator = scheduler.allocator
    assert allocator.num_free == allocator.num_blocks, "every KV block back on the free list"
    assert all(allocator.ref_count(b) == 0 for b in range(allocator.num_blocks))
    assert scheduler.swap_space.num_free == scheduler.swap_space.num_blocks, "every swap block free"
    assert not scheduler.running and len(scheduler.waiting) == 0 and not scheduler.requests
    assert sorted(scheduler._free_slots) == list(range(num_sequence_slots(scheduler.config)))


# ---- a randomized workload against the exact expected outputs ---------------------------------

def run_random_workload(core: EngineCore, clock: FakeClock, rng: random.Random,
                        pending: list[tuple[str, list[int], int, str, list[int]]],
                        expected: dict[str, tuple[list[int], str]], abort_rate: float, seed: int,
                        turn_s: float = 0.1, before_arrivals: Callable[[], object] | None = None,
                        each_turn: Callable[[], object] | None = None) -> None:
    """Sends `pending` over time (and aborts some requests at `abort_rate` a step) until all is done; each
    request that was not aborted gives its `expected` tokens and finish reason, an aborted one a prefix of
    them, and every block is free at the end. A turn: `turn_s` on the clock, `before_arrivals`, maybe an
    arrival and an abort, `each_turn`, one `EngineCore.step`."""
    scheduler = core.scheduler
    aborted: set[str] = set()
    tokens: dict[str, list[int]] = {}
    finals: dict[str, RequestOutput] = {}
    for _ in range(5000):
        clock.now += turn_s
        if before_arrivals is not None:
            before_arrivals()
        if pending and rng.random() < 0.4:
            request_id, prompt, max_tokens, priority, stop, *more = pending.pop(0)
            assert add(core, request_id, prompt, max_tokens, priority, arrival=clock.now,
                       stop_token_ids=stop, **(more[0] if more else {})) is None
        if rng.random() < abort_rate and scheduler.requests:
            victim = rng.choice(sorted(scheduler.requests))
            aborted.add(victim)
            for out in core.abort([victim]):
                finals[out.request_id] = out
        if each_turn is not None:
            each_turn()
        for out in core.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finish_reason is not None:
                finals[out.request_id] = out
        if not pending and not core.has_work():
            break
    else:
        raise AssertionError("the workload did not finish")
    for request_id, (want, reason) in expected.items():
        got = tokens.get(request_id, [])
        if request_id in aborted:
            assert got == want[:len(got)], request_id
        else:
            assert (got, finals[request_id].finish_reason) == (want, reason), f"{request_id} (seed {seed})"
            assert finals[request_id].stop_token_id == (want[-1] if reason == "stop" else None), request_id
    assert_all_free(scheduler)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
@pytest.mark.parametrize("policy", ["fcfs", "length-bucket"])
@pytest.mark.parametrize("prefix_cache", [True, False])
def test_random_workload_on_a_tiny_pool_gives_exact_outputs(preemption_mode: str, policy: str,
                                                            prefix_cache: bool) -> None:
    """Arrivals of all classes over time, shared prefixes, stop tokens, the context limit and
    aborts, on 16 blocks of 4 tokens with two steps in flight."""
    for seed in range(4):
        core = run_tiny_pool_workload(seed, preemption_mode, policy, prefix_cache)
        assert core.scheduler.num_preemptions > 0, "the pool is small enough to force preemption"


# Seeds whose configurations once never finished (a high prompt chunked past aged background work; its cached head
# in the free blocks), then the next seeds.
RANDOM_CONFIG_SEEDS = [8, 33, 74, 98, 99, 168] + list(range(40))


def test_random_configurations_finish_with_exact_outputs() -> None:
    """Pool, block and context sizes, step budgets down to 1 token, batch limits, high-priority slots, aging
    bounds, swap space, both policies, the prefix cache on and off, overlap on and off, aborts: every workload
    finishes, each request with its exact tokens, every block free."""
    for seed in RANDOM_CONFIG_SEEDS:
        rng = random.Random(seed)
        block_size, context = rng.choice([4, 8]), rng.choice([32, 48, 64])
        config = dict(num_blocks=context // block_size + rng.randint(0, 6), block_size=block_size,
                      max_context_length=context, num_cpu_blocks=rng.choice([0, 2, 8, 32]),
                      max_running_tokens=rng.choice([1, 2, 3, 5, 8, 16, 64]), max_running_requests=rng.randint(1, 6),
                      preemption_mode=rng.choice(["recompute", "swap"]),
                      schedule_policy=rng.choice(["fcfs", "length-bucket"]), disable_prefix_cache=rng.random() < 0.3,
                      max_background_wait_s=rng.choice([0.5, 2.0, 30.0]), high_priority_slots=rng.randint(0, 3),
                      high_priority_step_tokens=rng.choice([0, 1, 4, 16]), disable_overlap=rng.random() < 0.3)
        if config["preemption_mode"] == "swap":
            config["num_cpu_blocks"] = max(config["num_cpu_blocks"], 1)
        core, clock = make_engine(**config)
        shared = prompt_of(20, start=500)
        pending: list[tuple[str, list[int], int, str, list[int]]] = []
        expected: dict[str, tuple[list[int], str]] = {}
        for i in range(rng.randint(5, 30)):
            kind = rng.random()
            if kind < 0.5:  # a shared head, cut at and around block boundaries
                prompt = shared[:rng.choice([block_size, 2 * block_size, 2 * block_size + 1, 3 * block_size - 1, 20])]
                prompt += [rng.randrange(10, 400) for _ in range(rng.randint(0, 10))]
            elif kind < 0.65 and pending:  # a prefix of an earlier prompt
                earlier = rng.choice(pending)[1]
                prompt = earlier[:rng.randint(1, len(earlier))]
            elif kind < 0.75 and pending:  # an earlier prompt again
                prompt = list(rng.choice(pending)[1])
            else:
                prompt = [rng.randrange(10, 400) for _ in range(rng.randint(1, 20))]
            prompt = prompt[:context - 1]
            max_tokens = rng.randint(1, context + 5 - len(prompt))
            want = expected_tokens(prompt, min(max_tokens, context - len(prompt)))
            stop = [rng.choice(want)] if rng.random() < 0.15 else []
            expected[f"r{i}"] = (want[:want.index(stop[0]) + 1], "stop") if stop else (want, "length")
            pending.append((f"r{i}", prompt, max_tokens, rng.choice(["high", "normal", "normal", "background"]), stop))
        run_random_workload(core, clock, rng, pending, expected, abort_rate=rng.choice([0, 0.02, 0.1]), seed=seed,
                            turn_s=rng.choice([0.05, 0.5]))


def run_tiny_pool_workload(seed: int, preemption_mode: str, policy: str, prefix_cache: bool) -> EngineCore:
    rng = random.Random(seed)
    core, clock = make_engine(num_blocks=16, block_size=4, max_context_length=48, num_cpu_blocks=8,
                              max_running_tokens=rng.choice([8, 16, 64]), max_running_requests=6,
                              preemption_mode=preemption_mode, schedule_policy=policy,
                              disable_prefix_cache=not prefix_cache, max_background_wait_s=2.0)
    pending, expected = tiny_pool_requests(rng)
    run_random_workload(core, clock, rng, pending, expected, abort_rate=0.03, seed=seed)
    return core


def tiny_pool_requests(rng: random.Random, priorities: tuple[str, ...] = ("high", "normal", "background")
                       ) -> tuple[list[tuple[str, list[int], int, str, list[int]]], dict[str, tuple[list[int], str]]]:
    """24 requests for a context of 48 (some run into it), half of them sharing a prefix, a fifth with a stop
    token, each of a class drawn from `priorities`. Returns (run_random_workload's `pending`, `expected`)."""
    shared = prompt_of(12, start=500)
    expected: dict[str, tuple[list[int], str]] = {}
    pending = []
    for i in range(24):
        prompt = (shared[:rng.choice([4, 8, 12])] if rng.random() < 0.5 else []) + \
            [rng.randrange(10, 400) for _ in range(rng.randint(1, 14))]
        max_tokens = rng.randint(1, 60 - len(prompt))  # some run into the context length of 48
        want = expected_tokens(prompt, min(max_tokens, 48 - len(prompt)))
        stop = [rng.choice(want)] if rng.random() < 0.2 else []
        expected[f"r{i}"] = (want[:want.index(stop[0]) + 1], "stop") if stop else (want, "length")
        pending.append((f"r{i}", prompt, max_tokens, rng.choice(priorities), stop))
    return pending, expected


def test_a_plain_decode_gets_the_row_the_general_path_would_give(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same random workloads, with and without the shortcut for a decode of a token in flight: every
    step the worker gets is the same."""
    taken = []
    shortcut = Scheduler._add_plain_decode

    def counted(self: Scheduler, step, request: Request) -> bool:
        added = shortcut(self, step, request)
        taken.append(added)
        return added

    for seed, preemption_mode, prefix_cache in [(0, "recompute", True), (1, "swap", True), (2, "recompute", False)]:
        with monkeypatch.context() as patch:
            patch.setattr(Scheduler, "_add_plain_decode", counted)
            fast = run_tiny_pool_workload(seed, preemption_mode, "fcfs", prefix_cache)
        with monkeypatch.context() as patch:
            patch.setattr(Scheduler, "_add_plain_decode", lambda self, step, request: False)
            general = run_tiny_pool_workload(seed, preemption_mode, "fcfs", prefix_cache)
        assert general.worker.batches == fast.worker.batches
        # the prefix cache saw the same blocks: what a later prompt could reuse is the same
        assert general.scheduler.allocator._hash_of_block == fast.scheduler.allocator._hash_of_block
        assert general.scheduler.allocator.num_cached == fast.scheduler.allocator.num_cached
    assert sum(taken) > 300, "the shortcut took most decodes of tokens in flight"


# ---- priority classes -------------------------------------------------------------------------

def test_high_priority_is_admitted_before_earlier_normal_and_background() -> None:
    scheduler, worker, _ = make_scheduler(max_running_requests=2)
    add(scheduler, "n1", prompt_of(5), arrival=1.0)
    add(scheduler, "b1", prompt_of(5), priority="background", arrival=2.0)
    add(scheduler, "h1", prompt_of(5), priority="high", arrival=3.0)
    step_once(scheduler, worker)
    assert running_ids(scheduler) == ["h1"], "high's first step is its own"
    step_once(scheduler, worker)
    assert running_ids(scheduler) == ["h1", "n1"]


def test_background_request_waiting_past_the_bound_is_admitted_like_high() -> None:
    scheduler, worker, clock = make_scheduler(max_running_requests=1, background_share=0.0,
                                              max_background_wait_s=10.0)
    add(scheduler, "n1", prompt_of(5), max_tokens=3, arrival=1.0)
    add(scheduler, "b1", prompt_of(5), max_tokens=3, priority="background", arrival=2.0)
    add(scheduler, "n2", prompt_of(5), max_tokens=50, arrival=3.0)
    add(scheduler, "n3", prompt_of(5), max_tokens=3, arrival=4.0)
    for _ in range(4):
        step_once(scheduler, worker)
    assert running_ids(scheduler) == ["n2"], "before the bound, a freed slot goes to normal"
    clock.now = 9.9
    step_once(scheduler, worker)
    assert running_ids(scheduler) == ["n2"]
    clock.now = 10.0
    step_once(scheduler, worker)
    assert running_ids(scheduler) == ["b1"], "aged: it preempts running normal work and goes first"
    assert scheduler.num_preemptions == 1


def test_aged_background_request_does_not_push_out_background_work() -> None:
    scheduler, worker, clock = make_scheduler(max_running_requests=1, max_background_wait_s=10.0)
    add(scheduler, "b1", prompt_of(5), max_tokens=20, priority="background", arrival=1.0)
    add(scheduler, "b2", prompt_of(5, start=50), max_tokens=20, priority="background", arrival=2.0)
    outputs = collect_outputs(step_once(scheduler, worker)[1])
    assert running_ids(scheduler) == ["b1"]
    clock.now = 11.0  # b2 has waited past the bound: first come first served still bounds its wait
    while scheduler.has_unfinished():
        collect_outputs(step_once(scheduler, worker)[1], outputs)
        assert running_ids(scheduler) in (["b1"], ["b2"], [])
    assert outputs == {"b1": expected_tokens(prompt_of(5), 20), "b2": expected_tokens(prompt_of(5, start=50), 20)}
    assert scheduler.num_preemptions == 0
    assert_all_free(scheduler)


def test_split_slots_gives_each_class_its_share_and_normal_the_odd_slot() -> None:
    assert split_slots(4, 10, 10, 0.5) == (2, 2)
    assert split_slots(4, 10, 10, 0.25) == (3, 1)
    assert split_slots(1, 10, 10, 0.5) == (1, 0), "normal outranks background; aging bounds its wait"
    assert split_slots(4, 1, 10, 0.5) == (1, 3), "a class that needs fewer leaves the rest"
    assert split_slots(4, 10, 1, 0.5) == (3, 1)
    assert split_slots(4, 0, 10, 0.0) == (0, 4)
    assert split_slots(0, 10, 10, 0.5) == (0, 0)


@pytest.mark.parametrize("share, expected", [(0.5, ["n1", "n2", "b1", "b2"]), (0.25, ["n1", "n2", "n3", "b1"])])
def test_free_slots_are_shared_between_normal_and_background(share: float, expected: list[str]) -> None:
    scheduler, worker, _ = make_scheduler(max_running_requests=4, background_share=share)
    for i in range(1, 5):
        add(scheduler, f"b{i}", prompt_of(3), priority="background", arrival=float(i))
    for i in range(1, 5):
        add(scheduler, f"n{i}", prompt_of(3), arrival=10.0 + i)
    step_once(scheduler, worker)
    assert sorted(running_ids(scheduler)) == sorted(expected)


def test_normal_is_not_starved_when_slots_free_one_at_a_time() -> None:
    scheduler, worker, _ = make_scheduler(max_running_requests=2, background_share=0.5,
                                          max_background_wait_s=1e9)
    for i in range(6):
        add(scheduler, f"b{i}", prompt_of(3), max_tokens=30, priority="background", arrival=1.0 + i)
        add(scheduler, f"n{i}", prompt_of(3), max_tokens=2, arrival=1.5 + i)
    finished: list[str] = []
    for _ in range(12):
        finished += [o.request_id for o in step_once(scheduler, worker)[1] if o.finish_reason]
    assert finished == ["n0", "n1", "n2", "n3", "n4", "n5"], "each freed slot goes to normal, b0 keeps its own"


# ---- preemption -------------------------------------------------------------------------------

def _request(request_id: str, priority: str, arrival: float) -> Request:
    return Request(request_id, "", [1], SamplingParams(), priority, arrival)


def test_choose_victim_takes_the_lowest_class_newest_first() -> None:
    h, n_old, n_new = _request("h", "high", 9.0), _request("n_old", "normal", 1.0), _request("n_new", "normal", 2.0)
    b_old, b_new = _request("b_old", "background", 3.0), _request("b_new", "background", 4.0)
    assert choose_victim([h, n_old, n_new, b_old, b_new]).request_id == "b_new"
    assert choose_victim([h, n_old, n_new]).request_id == "n_new"
    b_new.aged = True
    assert choose_victim([h, n_old, b_new]).request_id == "n_old", "an aged request ranks as high"
    assert choose_victim([]) is None


def test_high_pushes_out_any_lower_class_and_aged_background_only_normal() -> None:
    h, n, b, aged = (_request("h", "high", 1.0), _request("n", "normal", 1.0), _request("b", "background", 1.0),
                     _request("aged", "background", 1.0))
    aged.aged = True
    assert [may_push_out(h, r) for r in (h, n, b, aged)] == [False, True, True, True]
    assert [may_push_out(aged, r) for r in (h, n, b, aged)] == [False, True, False, False]


def test_ranked_high_keeps_the_admission_order_of_those_ranking_as_high() -> None:
    queue = WaitingQueue(max_background_wait_s=10.0)
    paused_aged, paused_young = _request("paused_aged", "background", 1.0), _request("paused_young", "background", 2.0)
    for request in (paused_aged, paused_young):
        request.block_ids = [3]  # preempted for its slot alone: it kept its KV
    requests = [_request("b_aged", "background", 0.0), paused_aged, _request("n", "normal", 1.0),
                _request("h", "high", 1.0), paused_young, _request("b_young", "background", 5.0)]
    for request in requests:
        queue.add(request, request.arrival_time)

    ranked = [r.request_id for r in queue.ranked_high(now=11.0)]

    assert ranked == ["h", "paused_aged", "b_aged"]
    admission_order = queue.candidates(11.0, len(requests))
    assert ranked == [r.request_id for r in admission_order if r.priority == "high" or queue.is_aged(r, 11.0)]


def test_high_arrival_preempts_aged_background_work_last() -> None:
    scheduler, worker, clock = make_scheduler(high_priority_slots=0, max_running_requests=2, background_share=0.0,
                                              max_background_wait_s=10.0)
    add(scheduler, "n1", prompt_of(5), max_tokens=30, arrival=1.0)
    add(scheduler, "n2", prompt_of(5, 50), max_tokens=30, arrival=2.0)
    add(scheduler, "b", prompt_of(5, 100), max_tokens=30, priority="background", arrival=3.0)
    outputs = collect_outputs(step_once(scheduler, worker)[1])
    clock.now = 10.0  # b waited past the bound: aged, it pushes out n2 and ranks as high from then on
    collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert running_ids(scheduler) == ["n1", "b"] and scheduler.requests["b"].aged
    add(scheduler, "h1", prompt_of(5, 200), max_tokens=3, priority="high", arrival=11.0)
    collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert sorted(running_ids(scheduler)) == ["b", "h1"], "high pushes out unaged work first"
    add(scheduler, "h2", prompt_of(5, 250), max_tokens=3, priority="high", arrival=12.0)
    collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert sorted(running_ids(scheduler)) == ["h1", "h2"], "then aged work: high does not wait behind aging"
    while scheduler.has_unfinished():
        collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert outputs == {name: expected_tokens(prompt_of(5, start), n) for name, start, n in
                       (("n1", 10, 30), ("n2", 50, 30), ("b", 100, 30), ("h1", 200, 3), ("h2", 250, 3))}
    assert_all_free(scheduler)


def run_until_done(scheduler: Scheduler, worker: FakeWorker, outputs: dict[str, list[int]], max_steps: int = 300) -> None:
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return
        collect_outputs(step_once(scheduler, worker)[1], outputs)
    raise AssertionError(f"still unfinished after {max_steps} steps: " + ", ".join(
        f"{r.request_id} {r.status.value} at {r.num_computed_tokens}" for r in scheduler.requests.values()))


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_a_high_prompt_whose_cached_head_is_in_the_free_blocks_pushes_out_what_it_needs(preemption_mode: str) -> None:
    """The high prompt ran before: its first blocks are cached, and they are the free ones now. Starting it
    takes them off the free list and needs blocks for its first chunk past them: counting only the chunk, the
    scheduler pushed out no one, could not start it, and the normal requests sat out behind it, forever."""
    scheduler, worker, _ = make_scheduler(num_blocks=16, block_size=4, max_context_length=48, num_cpu_blocks=16,
                                          max_running_tokens=8, max_running_requests=4,
                                          preemption_mode=preemption_mode)
    high_prompt = prompt_of(20, 100)
    outputs: dict[str, list[int]] = {}
    add(scheduler, "h1", high_prompt, max_tokens=2, priority="high", arrival=1.0)
    run_until_done(scheduler, worker, outputs)
    add(scheduler, "n0", prompt_of(21, 300), max_tokens=8, arrival=2.0)
    add(scheduler, "n1", prompt_of(21, 400), max_tokens=8, arrival=3.0)
    while not all(r.num_computed_tokens >= 21 for r in scheduler.requests.values()):
        collect_outputs(step_once(scheduler, worker)[1], outputs)
    free = [b for b in range(16) if scheduler.allocator.is_free(b)]
    cached, _ = scheduler.allocator.cached_prefix(high_prompt, 4)
    assert cached and set(cached) <= set(free), "the setting: the high prompt's cached head is in the free blocks"
    add(scheduler, "h2", high_prompt, max_tokens=2, priority="high", arrival=4.0)
    run_until_done(scheduler, worker, outputs)
    assert outputs == {"h1": expected_tokens(high_prompt, 2), "h2": expected_tokens(high_prompt, 2),
                       "n0": expected_tokens(prompt_of(21, 300), 8), "n1": expected_tokens(prompt_of(21, 400), 8)}
    assert scheduler.num_preemptions > 0
    assert_all_free(scheduler)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_high_prompt_in_chunks_pushes_out_aged_background_work_not_itself(prefix_cache: bool) -> None:
    """Aged background requests rank as high, and being older they were taken as the victim after the new
    high request: it preempted itself for its second chunk's blocks, while they sat out its prefill; with the
    prefix cache the engine stalled, without it the high request re-prefilled forever."""
    scheduler, worker, clock = make_scheduler(num_blocks=16, block_size=4, max_context_length=48,
                                              max_running_tokens=8, max_running_requests=4, background_share=0.0,
                                              max_background_wait_s=0.0, disable_prefix_cache=not prefix_cache)
    outputs: dict[str, list[int]] = {}
    add(scheduler, "b0", prompt_of(21, 300), max_tokens=8, priority="background", arrival=1.0)
    add(scheduler, "b1", prompt_of(21, 400), max_tokens=8, priority="background", arrival=2.0)
    while not all(r.num_computed_tokens >= 21 for r in scheduler.requests.values()):
        clock.now += 1.0
        collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert all(r.aged for r in scheduler.running)
    add(scheduler, "h", prompt_of(24, 100), max_tokens=2, priority="high", arrival=clock.now)
    run_until_done(scheduler, worker, outputs)
    assert outputs == {"h": expected_tokens(prompt_of(24, 100), 2), "b0": expected_tokens(prompt_of(21, 300), 8),
                       "b1": expected_tokens(prompt_of(21, 400), 8)}
    assert scheduler.num_preemptions <= 2, "the aged work made room once, and h never gave way to it"
    assert_all_free(scheduler)


def test_the_victim_among_requests_ranking_high_is_aged_background_before_high() -> None:
    high, aged = _request("h", "high", 5.0), _request("aged", "background", 1.0)
    aged.aged = True
    assert choose_victim([high, aged]) is aged, "the older aged request still gives way to the high class"
    assert choose_victim([high, aged, _request("n", "normal", 0.5)]).request_id == "n"
    assert choose_victim([_request("h0", "high", 1.0), high]) is high, "the newest of one class"


def test_high_arrival_preempts_the_newest_background_request_only() -> None:
    # 10 blocks of 4: three running requests of 3 blocks each leave one free
    scheduler, worker, _ = make_scheduler(num_blocks=10, max_context_length=40)
    add(scheduler, "n", prompt_of(11), max_tokens=20, arrival=1.0)
    add(scheduler, "b_old", prompt_of(11, 100), max_tokens=20, priority="background", arrival=2.0)
    add(scheduler, "b_new", prompt_of(11, 200), max_tokens=20, priority="background", arrival=3.0)
    step_once(scheduler, worker)
    assert scheduler.allocator.num_free == 1
    add(scheduler, "h", prompt_of(9, 300), max_tokens=4, priority="high", arrival=4.0)
    step_once(scheduler, worker)
    assert running_ids(scheduler) == ["n", "b_old", "h"]
    assert [r.request_id for r in scheduler.waiting] == ["b_new"]
    assert scheduler.num_preemptions == 1


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_request_preempted_for_its_slot_keeps_its_kv_and_resumes_with_a_decode(preemption_mode: str) -> None:
    core, _ = make_engine(high_priority_slots=0, max_running_requests=2, num_cpu_blocks=16,
                          preemption_mode=preemption_mode)
    scheduler, worker = core.scheduler, core.worker
    add(scheduler, "b1", prompt_of(12), max_tokens=12, priority="background", arrival=1.0)
    add(scheduler, "b2", prompt_of(12, 100), max_tokens=12, priority="background", arrival=2.0)
    outputs: dict[str, list[int]] = {}
    for _ in range(4):
        collect_outputs(core.step(), outputs)
    free_before = scheduler.allocator.num_free
    add(scheduler, "h", prompt_of(5, 300), max_tokens=3, priority="high", arrival=3.0)
    collect_outputs(core.step(), outputs)
    b2 = scheduler.requests["b2"]
    assert running_ids(scheduler) == ["b1", "h"] and b2.block_ids, "b2 gave up its slot, not its blocks"
    assert scheduler.allocator.num_free == free_before - 2 and not worker.batches[-1].swap_out
    while "b2" not in running_ids(scheduler):
        collect_outputs(core.step(), outputs)
    resumed = worker.batches[-1]
    assert resumed.num_new_tokens[resumed.slots.index(b2.slot)] == 1, "a decode, not a recompute of its context"
    while core.has_work():
        collect_outputs(core.step(), outputs)
    assert outputs == {"b1": expected_tokens(prompt_of(12), 12), "b2": expected_tokens(prompt_of(12, 100), 12),
                       "h": expected_tokens(prompt_of(5, 300), 3)}
    assert_all_free(scheduler)


def test_background_request_paused_by_high_priority_resumes_before_aged_ones() -> None:
    scheduler, worker, clock = make_scheduler(high_priority_slots=0, max_running_requests=2, max_background_wait_s=10.0,
                                              max_context_length=128)
    add(scheduler, "b1", prompt_of(12), max_tokens=30, priority="background", arrival=1.0)
    add(scheduler, "b2", prompt_of(12, 100), max_tokens=30, priority="background", arrival=2.0)
    add(scheduler, "b3", prompt_of(40, 200), max_tokens=30, priority="background", arrival=3.0)
    step_tokens(scheduler, worker)
    clock.now = 11.0  # b3 is aged, but waits behind running background work
    add(scheduler, "h", prompt_of(5, 300), max_tokens=1, priority="high", arrival=11.0)
    assert step_tokens(scheduler, worker) == {"h": 5}
    assert scheduler.requests["b2"].is_paused and scheduler.waiting.is_aged(scheduler.requests["b3"], clock.now)
    assert step_tokens(scheduler, worker) == {"b1": 1, "b2": 1}, "b2 takes h's slot back with a decode"


def test_paused_requests_give_their_blocks_to_high_priority_that_lacks_them() -> None:
    # 8 blocks of 4 tokens, one slot: b is paused for h1 with its 3 blocks, and h2 needs 6
    scheduler, worker, _ = make_scheduler(high_priority_slots=0, num_blocks=8, max_running_requests=1,
                                          max_context_length=32)
    add(scheduler, "b", prompt_of(12), max_tokens=4, priority="background", arrival=1.0)
    outputs = collect_outputs(step_once(scheduler, worker)[1])
    add(scheduler, "h1", prompt_of(3, 100), max_tokens=2, priority="high", arrival=2.0)
    collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert scheduler.requests["b"].is_paused
    add(scheduler, "h2", prompt_of(22, 200), max_tokens=2, priority="high", arrival=3.0)
    for _ in range(40):
        collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert outputs == {"b": expected_tokens(prompt_of(12), 4), "h1": expected_tokens(prompt_of(3, 100), 2),
                       "h2": expected_tokens(prompt_of(22, 200), 2)}
    assert_all_free(scheduler)


def test_high_arrival_waits_when_only_high_work_runs() -> None:
    scheduler, worker, _ = make_scheduler(num_blocks=10, max_context_length=40)
    for i in range(3):
        add(scheduler, f"h{i}", prompt_of(11, 100 * i), max_tokens=20, priority="high", arrival=1.0 + i)
    step_once(scheduler, worker)
    add(scheduler, "h_late", prompt_of(9, 300), max_tokens=4, priority="high", arrival=9.0)
    step_once(scheduler, worker)
    assert "h_late" not in running_ids(scheduler) and scheduler.num_preemptions == 0


def test_running_requests_short_of_blocks_preempt_the_newest_lowest_class() -> None:
    # 9 blocks of 4; every request's decode needs a fourth block at the same step
    scheduler, worker, _ = make_scheduler(num_blocks=9, max_context_length=36)
    add(scheduler, "n_old", prompt_of(12), max_tokens=8, arrival=1.0)
    add(scheduler, "n_new", prompt_of(12, 100), max_tokens=8, arrival=2.0)
    add(scheduler, "b", prompt_of(12, 200), max_tokens=8, priority="background", arrival=0.5)
    step_once(scheduler, worker)
    step_once(scheduler, worker)
    assert running_ids(scheduler) == ["n_old", "n_new"] and [r.request_id for r in scheduler.waiting] == ["b"]


# ---- the step pipeline ------------------------------------------------------------------------

def test_server_sends_the_next_step_just_before_a_long_step_ends() -> None:
    scheduler, worker, clock = make_scheduler()
    core = EngineCore(scheduler.config, worker, clock=clock)
    core.scheduler = scheduler
    add(scheduler, "b", prompt_of(5), max_tokens=50, priority="background")
    assert core.submit_due() and core.submit_due(), "no step measured yet: two in flight"
    clock.now = 1.0
    result = worker.collect()
    result.launch_time_s = 0.002  # the worker's host time before the step's launch
    core.complete(result)
    ahead = core.send_ahead_s()
    assert ahead == pytest.approx(SEND_AHEAD_FACTOR * 0.002 + SEND_AHEAD_SLACK_S)
    assert not core.submit_due(), "steps take 1 s: the next goes in when the running one is about to end"
    clock.now = 1.5
    add(scheduler, "h", prompt_of(5, 100), max_tokens=2, priority="high", arrival=1.5)
    assert core.seconds_until_due() == pytest.approx(0.5 - ahead)
    clock.now = 2.0 - ahead
    assert core.submit_due()
    assert scheduler.requests["h"].slot in worker.batches[2].slots, "h is in the step after the one it arrived in"
    clock.now = 2.0
    core.complete(worker.collect())
    clock.now = 2.01
    core.complete(worker.collect())  # h's prompt and b's decode: 6 tokens in 10 ms
    assert core.submit_due() and not core.submit_due()
    assert core.seconds_until_due() == pytest.approx(0.01 - ahead), "the last step's 10 ms, not the 1 s of before"


def test_the_send_ahead_follows_the_host_time_of_recent_steps_of_a_size_and_a_step_is_timed_by_its_size() -> None:
    timing = SendTiming()
    assert timing.send_ahead_s(256) == SEND_AHEAD_MAX_S, "nothing measured: as far ahead as ever needed"
    timing.record(8192, duration_s=0.015, schedule_s=0.001, launch_s=0.0015)
    assert timing.send_ahead_s(256) == pytest.approx(SEND_AHEAD_FACTOR * 0.0025 + SEND_AHEAD_SLACK_S), \
        "a size not seen yet: the most any recent step took"
    timing.record(256, duration_s=0.003, schedule_s=0.0005, launch_s=0.0005)
    assert timing.expected_duration_s(8000) == 0.015 and timing.expected_duration_s(200) == 0.003
    assert timing.expected_duration_s(1000) == 0.003, "a size not seen yet: the last step's time"
    assert timing.send_ahead_s(256) == pytest.approx(SEND_AHEAD_FACTOR * 0.001 + SEND_AHEAD_SLACK_S), \
        "decodes after a prefill: the decodes' host time"
    assert timing.send_ahead_s(8000) == pytest.approx(SEND_AHEAD_FACTOR * 0.0025 + SEND_AHEAD_SLACK_S)
    timing.record(300, duration_s=0.05, schedule_s=0.001, launch_s=0.04)  # a long eager step's host work
    assert timing.send_ahead_s(300) == SEND_AHEAD_MAX_S
    assert timing.send_ahead_s(20000) == SEND_AHEAD_MAX_S, "a size not among the recent steps: the most of them"
    for _ in range(RECENT_STEPS - 1):
        timing.record(256, duration_s=0.003, schedule_s=0.0002, launch_s=0.0002)
    assert timing.send_ahead_s(300) == SEND_AHEAD_MAX_S, "the eager step counts for RECENT_STEPS steps"
    assert timing.send_ahead_s(256) == SEND_AHEAD_MIN_S, "but not for steps of another size"
    timing.record(256, duration_s=0.003, schedule_s=0.0002, launch_s=0.0002)
    assert timing.send_ahead_s(300) == timing.send_ahead_s(20000) == SEND_AHEAD_MIN_S, "then it is forgotten"


# ---- chunked prefill and length buckets -------------------------------------------------------

def test_long_prompt_is_prefilled_in_chunks_beside_running_decodes() -> None:
    scheduler, worker, _ = make_scheduler(max_running_tokens=16, max_context_length=128)
    add(scheduler, "d1", prompt_of(3), max_tokens=20, arrival=1.0)
    add(scheduler, "d2", prompt_of(3, 50), max_tokens=20, arrival=2.0)
    step_once(scheduler, worker)
    add(scheduler, "long", prompt_of(40, 100), max_tokens=2, arrival=3.0)
    chunks = []
    for _ in range(3):
        step, _ = step_once(scheduler, worker)
        chunks.append((step.batch.num_new_tokens, step.batch.sample))
    assert chunks == [([1, 1, 14], [True, True, False]), ([1, 1, 14], [True, True, False]),
                      ([1, 1, 12], [True, True, True])]
    assert all(sum(batch.num_new_tokens) <= 16 for batch in worker.batches)


def step_tokens(scheduler: Scheduler, worker: FakeWorker) -> dict[str, int]:
    """One step without overlap; the tokens it computed, by request id."""
    step = scheduler.schedule()
    by_slot = {r.slot: r.request_id for r in scheduler.running}
    worker.submit(step.batch)
    scheduler.process_result(step, worker.collect())
    return {by_slot[slot]: n for slot, n in zip(step.batch.slots, step.batch.num_new_tokens)}


def test_other_requests_sit_out_until_high_priority_has_its_first_token() -> None:
    scheduler, worker, _ = make_scheduler(max_running_tokens=16, max_running_requests=4, max_context_length=128)
    add(scheduler, "d", prompt_of(3), max_tokens=20, arrival=1.0)
    add(scheduler, "n", prompt_of(60, 100), max_tokens=2, arrival=2.0)
    assert step_tokens(scheduler, worker) == {"d": 3, "n": 13}
    add(scheduler, "h", prompt_of(40, 300), max_tokens=5, priority="high", arrival=3.0)
    add(scheduler, "late", prompt_of(20, 500), max_tokens=2, arrival=3.5)
    chunks = [step_tokens(scheduler, worker) for _ in range(4)]
    assert chunks[:3] == [{"h": 16}, {"h": 16}, {"h": 8}], "while high prefills, its steps are its own"
    assert chunks[3] == {"h": 1, "d": 1, "n": 14}, "after its last chunk, lower-class prefill goes on"


def test_aged_background_prefill_sits_out_for_high_priority_too() -> None:
    scheduler, worker, clock = make_scheduler(max_running_tokens=16, max_running_requests=2, max_context_length=128,
                                              background_share=0.0, max_background_wait_s=10.0)
    add(scheduler, "d", prompt_of(3), max_tokens=30, arrival=1.0)
    add(scheduler, "n", prompt_of(3, 50), max_tokens=30, arrival=2.0)
    add(scheduler, "b", prompt_of(60, 100), max_tokens=2, priority="background", arrival=3.0)
    step_once(scheduler, worker)
    clock.now = 10.0
    assert step_tokens(scheduler, worker) == {"d": 1, "b": 15} and scheduler.requests["b"].aged
    add(scheduler, "h", prompt_of(5, 300), max_tokens=1, priority="high", arrival=11.0)
    assert step_tokens(scheduler, worker) == {"h": 5}, "h pushed out d; aged b waits for h's first token"
    assert step_tokens(scheduler, worker) == {"b": 16}


def test_steps_without_high_priority_prompts_are_short_while_it_came_lately() -> None:
    scheduler, worker, clock = make_scheduler(max_running_tokens=32, high_priority_step_tokens=8,
                                              max_running_requests=4, max_context_length=128)
    add(scheduler, "n1", prompt_of(40, 100), max_tokens=30, arrival=1.0)
    assert step_tokens(scheduler, worker) == {"n1": 32}, "no high priority yet: the whole budget"
    add(scheduler, "h", prompt_of(20, 300), max_tokens=30, priority="high", arrival=2.0)
    assert step_tokens(scheduler, worker) == {"h": 20}, "a step with its prompt keeps the whole budget"
    add(scheduler, "n2", prompt_of(40, 500), max_tokens=2, arrival=3.0)
    assert step_tokens(scheduler, worker) == {"h": 1, "n1": 7}
    assert step_tokens(scheduler, worker) == {"h": 1, "n1": 1, "n2": 6}
    clock.now += HIGH_PRIORITY_LATELY_S + 1
    assert step_tokens(scheduler, worker) == {"h": 1, "n1": 1, "n2": 30}, "none came lately: the whole budget"


@pytest.mark.parametrize("device_type, expected", [("cuda", 2048), ("cpu", 256)])
def test_the_step_budget_near_high_priority_is_the_workers_devices_unless_given(device_type: str,
                                                                               expected: int) -> None:
    scheduler, worker, _ = make_scheduler()
    worker.info.device_type = device_type
    assert scheduler.config.high_priority_step_tokens is None
    assert EngineCore(scheduler.config, worker).scheduler.config.high_priority_step_tokens == expected
    given = ServerConfig(high_priority_step_tokens=100).scheduler()
    assert EngineCore(given, worker).scheduler.config.high_priority_step_tokens == 100


def test_high_priority_step_tokens_0_keeps_the_whole_budget() -> None:
    scheduler, worker, _ = make_scheduler(max_running_tokens=32, high_priority_step_tokens=0,
                                          max_running_requests=4, max_context_length=128)
    add(scheduler, "h", prompt_of(4, 300), max_tokens=30, priority="high", arrival=1.0)
    assert step_tokens(scheduler, worker) == {"h": 4}
    add(scheduler, "n", prompt_of(40, 500), max_tokens=2, arrival=2.0)
    assert step_tokens(scheduler, worker) == {"h": 1, "n": 31}


def test_order_by_length_bucket_puts_the_largest_64_token_group_first() -> None:
    class Item:
        def __init__(self, n: int) -> None:
            self.num_tokens = n
    lengths = [10, 70, 130, 75, 20, 127, 80, 140]
    ordered = [item.num_tokens for item in order_by_length_bucket([Item(n) for n in lengths])]
    assert ordered == [70, 75, 127, 80, 10, 20, 130, 140], "4 in [64, 128), then two pairs by first arrival"


def test_length_bucket_policy_admits_the_largest_bucket_first() -> None:
    scheduler, worker, _ = make_scheduler(max_running_requests=3, schedule_policy="length-bucket",
                                          max_context_length=256, num_blocks=256)
    for i, length in enumerate([10, 100, 20, 110, 120, 200, 105]):
        add(scheduler, f"r{length}", prompt_of(length), arrival=1.0 + i)
    step_once(scheduler, worker)
    assert running_ids(scheduler) == ["r100", "r110", "r120"]


# ---- prefix cache -----------------------------------------------------------------------------

def test_prefix_cache_shares_full_blocks_and_computes_the_last_token() -> None:
    scheduler, worker, _ = make_scheduler(max_context_length=64)
    prompt = prompt_of(9)
    add(scheduler, "a", prompt, max_tokens=8, arrival=1.0)
    outputs = collect_outputs(step_once(scheduler, worker)[1])
    a = scheduler.requests["a"]
    add(scheduler, "b", prompt, max_tokens=8, arrival=2.0)
    step, out = step_once(scheduler, worker)
    collect_outputs(out, outputs)
    b = scheduler.requests["b"]
    assert step.batch.num_new_tokens == [1, 1], "a decodes; b's whole prompt hit still computes its last token"
    assert b.block_ids[:2] == a.block_ids[:2] and b.block_ids[2] != a.block_ids[2]
    assert [scheduler.allocator.ref_count(x) for x in b.block_ids] == [2, 2, 1]
    assert b.num_cached_tokens == 8
    add(scheduler, "c", prompt_of(6) + [999], max_tokens=2, arrival=3.0)
    collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert scheduler.requests["c"].num_cached_tokens == 4, "only whole blocks are shared"
    while scheduler.has_unfinished():
        collect_outputs(step_once(scheduler, worker)[1], outputs)
    assert outputs["a"] == outputs["b"] == expected_tokens(prompt, 8)
    assert_all_free(scheduler)
    assert scheduler.allocator.num_cached > 0, "freed blocks stay cached"


def test_a_cache_salt_shares_cached_prefixes_only_among_its_own_requests() -> None:
    """vLLM's cache_salt: a prompt cached under one salt (or none) is computed anew under another, and taken from
    the cache under its own; the tokens are the same every way."""
    scheduler, worker, _ = make_scheduler(max_context_length=64)
    prompt = prompt_of(9)

    def run(name: str, salt: str | None) -> tuple[int, list[int]]:
        scheduler.add_request(GenerateRequest(request_id=name, prompt_token_ids=prompt, arrival_time=1.0,
                                              cache_salt=salt, params=SamplingParams(max_tokens=3, ignore_eos=True)))
        outputs: list[RequestOutput] = []
        while scheduler.has_unfinished():
            outputs += step_once(scheduler, worker)[1]
        return max(out.num_cached_tokens for out in outputs), collect_outputs(outputs)[name]

    first = run("plain", None)
    assert first[0] == 0
    assert run("tenant-a", "a")[0] == 0, "the unsalted blocks are not the salt's"
    assert run("tenant-b", "b")[0] == 0, "nor are another salt's"
    assert run("tenant-a-again", "a")[0] == 8, "its own salt's two full blocks"
    assert run("plain-again", None) == (8, first[1])
    assert run("tenant-b-again", "b")[1] == first[1]
    assert_all_free(scheduler)


def test_prefix_cache_is_off_when_disabled() -> None:
    scheduler, worker, _ = make_scheduler(disable_prefix_cache=True)
    for name in ("a", "b"):
        add(scheduler, name, prompt_of(9), max_tokens=2)
        while scheduler.has_unfinished():
            step_once(scheduler, worker)
    assert scheduler.stats()["prefix_cache_hits"] == 0 and scheduler.allocator.num_cached == 0


def test_allocator_evicts_the_least_recently_freed_cached_block() -> None:
    allocator = BlockAllocator(4, block_size=2)
    first = allocator.allocate(2)
    second = allocator.allocate(2)
    h1 = allocator.register(first[0], None, (1, 2))
    allocator.register(first[1], h1, (3, 4))
    h3 = allocator.register(second[0], None, (5, 6))
    allocator.free(second)
    allocator.free(first)  # the tail goes first: first[1] is older in the free list than first[0]
    assert allocator.num_free == 4 and allocator.num_cached == 3
    assert allocator.allocate(2) == [second[1], second[0]], "uncached and older blocks go first"
    assert allocator.match_prefix([5, 6, 7], 1) == ([], []), "evicted on allocation"
    assert allocator.match_prefix([1, 2, 3, 4, 9], 2) == (first, [h1, allocator.chain_hash(h1, (3, 4))])
    assert [allocator.ref_count(b) for b in first] == [1, 1] and allocator.num_free == 0
    assert allocator.match_prefix([1, 2, 3, 4], 1)[0] == [first[0]], "max_blocks caps the hit"
    assert allocator.ref_count(first[0]) == 2
    allocator.free([first[0]])
    allocator.free(first)
    assert allocator.num_free == 2 and h3 not in allocator._cached


def test_prefix_cache_stats_count_each_admission_once() -> None:
    scheduler, worker, _ = make_scheduler(num_blocks=8, max_context_length=32)
    add(scheduler, "a", prompt_of(9), max_tokens=1, arrival=1.0)
    while scheduler.has_unfinished():
        step_once(scheduler, worker)
    add(scheduler, "big", prompt_of(20, 100), max_tokens=4, arrival=2.0)
    step_once(scheduler, worker)
    add(scheduler, "b", prompt_of(9) + prompt_of(8, 200), max_tokens=1, arrival=3.0)  # 3 blocks short
    for _ in range(3):
        step_once(scheduler, worker)
        assert scheduler.requests["b"] in list(scheduler.waiting)
    while scheduler.has_unfinished():
        step_once(scheduler, worker)
    assert scheduler.num_preemptions == 0
    stats = scheduler.stats()
    # looked up (whole blocks before the last token): a 8, big 16, b 16 of which a's 8 hit
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (40, 8)
    assert (stats["num_prompt_tokens"], stats["num_cached_prompt_tokens"]) == (46, 8)


def test_stats_are_logged_periodically(caplog: pytest.LogCaptureFixture) -> None:
    scheduler, worker, clock = make_scheduler()
    add(scheduler, "a", prompt_of(9), max_tokens=30, arrival=1.0)
    add(scheduler, "b", prompt_of(9), max_tokens=30, arrival=2.0)
    with caplog.at_level(logging.INFO, logger="sfllm.scheduler.scheduler"):
        for _ in range(10):
            clock.now += 3.0
            step_once(scheduler, worker)
    lines = [r.getMessage() for r in caplog.records if "prefix cache" in r.getMessage()]
    assert len(lines) == 2, "at 12 s and 24 s of 30"
    assert "8/16 looked-up tokens hit (50.0%)" in lines[-1] and "8/18 prompt tokens cached (44.4%)" in lines[-1]


# ---- limits, errors and cleanup ---------------------------------------------------------------

def test_full_class_queue_answers_503_and_long_prompt_400() -> None:
    scheduler, _, _ = make_scheduler(max_waiting_requests=2, max_context_length=32)
    assert add(scheduler, "n1", prompt_of(3)) is None
    assert add(scheduler, "n2", prompt_of(3)) is None
    full = add(scheduler, "n3", prompt_of(3))
    assert (full.finish_reason, full.error_code) == ("error", 503) and "normal queue" in full.error
    assert add(scheduler, "h1", prompt_of(3), priority="high") is None, "each class has its own limit"
    too_long = add(scheduler, "long", prompt_of(32))
    assert too_long.error_code == 400 and "32 tokens" in too_long.error
    assert add(scheduler, "fits", prompt_of(31), priority="background") is None
    assert add(scheduler, "n1", prompt_of(3), priority="high").error_code == 400, "id in use"
    assert add(scheduler, "empty", []).error_code == 400
    assert add(scheduler, "bad", prompt_of(3), priority="urgent").error_code == 400


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_every_block_is_free_after_aborts_in_any_state(preemption_mode: str) -> None:
    core, _ = make_engine(num_blocks=10, max_context_length=40, num_cpu_blocks=10, max_running_tokens=8,
                          preemption_mode=preemption_mode)
    scheduler = core.scheduler
    for i in range(6):
        add(scheduler, f"r{i}", prompt_of(10, 50 * i), max_tokens=25,
            priority=["normal", "background", "high"][i % 3], arrival=1.0 + i)
    for _ in range(12):
        core.step()
    states = {r.status.value for r in scheduler.requests.values()}
    assert scheduler.num_preemptions > 0 and {"running", "waiting" if preemption_mode == "recompute"
                                              else "swapped"} <= states
    in_flight_before = core.num_in_flight
    outputs = core.abort(sorted(scheduler.requests))
    assert len(outputs) == 6 and all(o.finish_reason == "abort" for o in outputs)
    assert in_flight_before > 0, "aborted with a step in flight"
    drain(core)
    assert_all_free(scheduler)


@pytest.mark.parametrize("overlap", [True, False])
def test_rows_short_of_min_tokens_are_marked_with_tokens_in_flight(overlap: bool) -> None:
    """Every sampled row of a request whose output has fewer than min_tokens tokens (counting those in flight)
    is in the step's min_tokens_rows, and no other row is."""
    core, _ = make_engine(num_blocks=64, block_size=4, max_context_length=64, disable_overlap=not overlap)
    min_tokens = {"a": 5, "b": 0, "c": 2}
    for index, (request_id, minimum) in enumerate(min_tokens.items()):
        add(core, request_id, prompt_of(3 + index), max_tokens=8, min_tokens=minimum)
    drain(core)
    owners = dict(zip(core.worker.batches[0].slots, min_tokens))  # all three start in the first step, in order
    assert len(owners) == 3
    produced = dict.fromkeys(min_tokens, 0)
    marked = 0
    for batch in core.worker.batches:
        sampled = [slot for slot, sample in zip(batch.slots, batch.sample) if sample]
        expected = []
        for row, slot in enumerate(sampled):
            request_id = owners[slot]
            if produced[request_id] < min_tokens[request_id]:
                expected.append(row)
            produced[request_id] += 1
        assert batch.min_tokens_rows == expected, batch.step_id
        marked += len(expected)
    assert marked == 5 + 2 and produced == dict.fromkeys(min_tokens, 8)



@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_min_tokens_holds_with_preemption_aborts_and_steps_in_flight(preemption_mode: str) -> None:
    """Requests whose stop token comes early, each with a min_tokens, on the tiny pool: the fake model draws the
    next token that is neither EOS nor a stop token where the step marks the row, so an output equals the
    expected one only if every step marked exactly the rows short of min_tokens, through preemption."""
    for seed in range(4):
        rng = random.Random(seed)
        core, clock = make_engine(num_blocks=16, block_size=4, max_context_length=48, num_cpu_blocks=8,
                                  max_running_tokens=rng.choice([8, 16, 64]), max_running_requests=6,
                                  preemption_mode=preemption_mode)
        pending, expected = [], {}
        for i in range(16):
            prompt = [rng.randrange(10, 400) for _ in range(rng.randint(1, 14))]
            max_tokens = rng.randint(2, 48 - len(prompt))
            plain = expected_tokens(prompt, max_tokens)
            stop = [plain[rng.randrange(min(4, len(plain)))]]  # early: min_tokens passes over it
            min_tokens = rng.randint(0, max_tokens)
            sequence, reason = list(prompt), "length"
            while len(sequence) - len(prompt) < max_tokens:
                short = len(sequence) - len(prompt) < min_tokens
                token = unending_token(tuple(sequence), stop + [EOS]) if short else next_token(tuple(sequence))
                sequence.append(token)
                if token in stop:
                    reason = "stop"
                    break
            expected[f"m{i}"] = (sequence[len(prompt):], reason)
            pending.append((f"m{i}", prompt, max_tokens, "normal", stop, {"min_tokens": min_tokens}))
        run_random_workload(core, clock, rng, pending, expected, abort_rate=0.02, seed=seed)
        assert core.scheduler.num_preemptions > 0, "the pool is small enough to force preemption"
