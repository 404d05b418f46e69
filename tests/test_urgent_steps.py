"""High priority under a full batch: its slots past the batch limit, and its urgent steps, which the worker runs
before the step it holds (Scheduler.schedule_urgent, EngineCore.submit_urgent).

On test_scheduler_policies' fake worker, whose pool of token ids turns a block shared, reused or read before it
is written into a wrong token or a failed assertion: an urgent step that took a block or a slot the held step
still writes, or read a cached block that the held step has yet to fill, fails these tests.
"""
from __future__ import annotations

import random

import pytest
from test_scheduler_policies import (FakeClock, FakeWorker, add, assert_all_free, collect_outputs, expected_tokens,
                                     make_scheduler, prompt_of, run_random_workload, running_ids, step_once,
                                     tiny_pool_requests)

from sfllm.engine.engine_core import EngineCore
from sfllm.engine.send_timing import HOLD_MIN_STEP_S
from sfllm.messages import ForwardBatch, ForwardResult
from sfllm.scheduler.scheduler import HIGH_PRIORITY_LATELY_S

STEP_S = 2 * HOLD_MIN_STEP_S  # what each step takes on the fake clock: long enough to be held


class HoldingWorker(FakeWorker):
    """A worker in its own process, on the fake clock: a step sent with a hold waits until a later step that is
    not urgent comes or its result is wanted; an urgent step runs before it where `jump` (it came within the
    hold), else after it (the hold was over). Each result collected moves the clock by STEP_S."""
    in_own_process = True

    def __init__(self, clock: FakeClock, jump: bool, num_blocks: int, block_size: int,
                 max_context_length: int) -> None:
        super().__init__(num_blocks, block_size, max_context_length)
        self.info.holds_steps = True
        self.clock = clock
        self.jump = jump
        self.held: ForwardBatch | None = None
        self.num_urgent = self.num_jumped = 0

    def submit(self, batch: ForwardBatch) -> None:
        if batch.urgent:
            self.num_urgent += 1
            if self.held is not None and self.jump:
                self.num_jumped += 1
                super().submit(batch)
                return
        self._run_held()
        if batch.hold_s > 0:
            self.held = batch
        else:
            super().submit(batch)

    def _run_held(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            super().submit(held)

    def collect(self) -> ForwardResult:
        if not self._results:
            self._run_held()
        self.clock.now += STEP_S
        return super().collect()


def make_holding_engine(jump: bool = True, num_blocks: int = 64, block_size: int = 4, max_context_length: int = 64,
                        **config) -> tuple[EngineCore, HoldingWorker, FakeClock]:
    scheduler, _, clock = make_scheduler(num_blocks, block_size, max_context_length, **config)
    worker = HoldingWorker(clock, jump, num_blocks, block_size, max_context_length)
    core = EngineCore(scheduler.config, worker, clock=clock)
    core.scheduler = scheduler
    return core, worker, clock


def run_until_done(core: EngineCore, outputs: dict[str, list[int]]) -> None:
    for _ in range(1000):
        if not core.has_work():
            return
        collect_outputs(core.step(), outputs)
    raise AssertionError("the engine still has work")


def send_held_step(core: EngineCore) -> ForwardBatch:
    """The step after the one in flight, which the worker holds."""
    assert core.submit_next() and core.num_in_flight == 2 and core.worker.held is not None
    return core.worker.held


def start_background_load(core: EngineCore, count: int) -> dict[str, list[int]]:
    outputs = run_background_load(core, count)
    send_held_step(core)
    return outputs


def run_background_load(core: EngineCore, count: int, max_tokens: int = 20,
                        high_priority_first: bool = True) -> dict[str, list[int]]:
    """`count` background requests, run until they decode with a step in flight; after a high-priority request
    unless not `high_priority_first` (steps are held only within a while of one)."""
    if high_priority_first:
        add(core, "warm-up", prompt_of(3, 5000), max_tokens=1, priority="high", arrival=0.5)
    outputs: dict[str, list[int]] = {}
    for i in range(count):
        add(core, f"b{i}", prompt_of(6, 100 * (i + 1)), max_tokens=max_tokens, priority="background",
            arrival=1.0 + i)
    for _ in range(6):
        collect_outputs(core.step(), outputs)
    assert core.num_in_flight == 1
    outputs.pop("warm-up", None)
    return outputs


@pytest.mark.parametrize("jump", [True, False])
def test_a_high_priority_arrival_runs_before_the_held_step(jump: bool) -> None:
    core, worker, _ = make_holding_engine(jump, max_running_requests=3, high_priority_slots=1)
    outputs = start_background_load(core, 3)
    held = worker.held
    add(core, "h", prompt_of(9, 900), max_tokens=3, priority="high", arrival=10.0)
    assert core.submit_urgent()
    urgent = worker.batches[-1]
    assert urgent.urgent and urgent.slots == [core.scheduler.requests["h"].slot] and urgent.num_new_tokens == [9]
    assert urgent.slots[0] not in held.slots, "a slot past the batch limit: no one was pushed out"
    assert core.scheduler.num_preemptions == 0 and len(core.scheduler.running) == 4
    assert not core.submit_urgent(), "no high-priority request left waiting"
    assert worker.num_jumped == int(jump)
    run_until_done(core, outputs)
    assert outputs == {**{f"b{i}": expected_tokens(prompt_of(6, 100 * (i + 1)), 20) for i in range(3)},
                       "h": expected_tokens(prompt_of(9, 900), 3)}
    assert_all_free(core.scheduler)


def test_steps_are_held_only_within_a_while_of_a_high_priority_arrival() -> None:
    core, worker, clock = make_holding_engine(max_running_requests=3, high_priority_slots=1)
    run_background_load(core, 3, high_priority_first=False)
    assert core.submit_next() and worker.held is None, "no high-priority request yet: nothing to hold for"
    add(core, "h", prompt_of(9, 900), max_tokens=1, priority="high", arrival=clock.now)
    for _ in range(3):
        core.step()
    assert core.num_in_flight == 1 and core.submit_next() and worker.held is not None
    clock.now += HIGH_PRIORITY_LATELY_S
    core.step()
    assert core.submit_next() and worker.held is None, "none came lately"


def test_no_urgent_step_once_the_held_step_is_due_or_launched() -> None:
    core, worker, clock = make_holding_engine(max_running_requests=3, high_priority_slots=1)
    start_background_load(core, 3)
    add(core, "h", prompt_of(9, 900), max_tokens=3, priority="high", arrival=10.0)
    clock.now += STEP_S
    assert not core.submit_urgent(), "past the hold: the worker has launched it, the next step takes h"
    core.step()  # the step in flight is back: the held step is the oldest now
    clock.now -= STEP_S
    assert not core.submit_urgent()
    assert worker.num_urgent == 0


def test_an_abort_while_a_step_is_held_keeps_high_priority_for_the_next_step() -> None:
    """The aborted request's row in the held step still writes its blocks and its slot: nothing released after
    the held step was built may go to an urgent step."""
    core, worker, _ = make_holding_engine(max_running_requests=3, high_priority_slots=1)
    outputs = start_background_load(core, 3)
    core.abort(["b1"])
    add(core, "h", prompt_of(9, 900), max_tokens=3, priority="high", arrival=10.0)
    assert not core.submit_urgent() and worker.num_urgent == 0
    run_until_done(core, outputs)
    assert outputs["h"] == expected_tokens(prompt_of(9, 900), 3)
    assert_all_free(core.scheduler)


def test_an_urgent_step_does_not_read_cached_blocks_that_the_held_step_fills() -> None:
    """The held step prefills a prompt whose blocks it offers to the prefix cache; a high-priority request with
    the same prefix, run before it, must compute that prefix itself, while blocks filled before are shared."""
    core, worker, _ = make_holding_engine(max_running_requests=4, high_priority_slots=1, max_running_tokens=64)
    outputs = run_background_load(core, 2)
    shared = prompt_of(12, 700)
    add(core, "n", shared + [5], max_tokens=2, arrival=20.0)
    held = send_held_step(core)
    assert 13 in held.num_new_tokens, "the held step prefills n"
    add(core, "h", shared + [6], max_tokens=2, priority="high", arrival=21.0)
    assert core.submit_urgent()
    assert worker.batches[-1].num_new_tokens == [13], "no cached block of the held step's: all 13 computed"
    run_until_done(core, outputs)
    assert outputs["h"] == expected_tokens(shared + [6], 2) and outputs["n"] == expected_tokens(shared + [5], 2)
    # once n's blocks are written, the next high-priority request shares them
    add(core, "h2", shared + [7], max_tokens=2, priority="high", arrival=30.0)
    collect_outputs(step_once(core.scheduler, worker)[1], outputs)
    assert worker.batches[-1].num_new_tokens == [1], "12 of its 13 tokens cached"
    run_until_done(core, outputs)
    assert outputs["h2"] == expected_tokens(shared + [7], 2)
    assert_all_free(core.scheduler)


@pytest.mark.parametrize("jump", [True, False])
def test_random_workloads_with_urgent_steps_give_exact_outputs(jump: bool) -> None:
    """test_scheduler_policies' random workloads, half of them high priority, each turn trying an urgent step
    (aborts, shared prefixes, the context limit and preemptions among them), the worker running each urgent
    step before the held step or after it."""
    num_urgent = 0
    for seed in range(10):
        rng = random.Random(seed)
        core, worker, clock = make_holding_engine(jump, num_blocks=24, max_context_length=48,
                                                  max_running_tokens=rng.choice([32, 64]), max_running_requests=3,
                                                  high_priority_slots=rng.choice([1, 2]), max_background_wait_s=2.0,
                                                  high_priority_step_tokens=rng.choice([0, 5, 12]))
        pending, expected = tiny_pool_requests(rng, ("high", "high", "normal", "background"))
        # as the server: the next step goes out, requests arrive, an urgent step for them
        run_random_workload(core, clock, rng, pending, expected, abort_rate=0.03, seed=seed, turn_s=0.001,
                            before_arrivals=core.submit_next, each_turn=core.submit_urgent)
        num_urgent += worker.num_jumped if jump else worker.num_urgent
    assert num_urgent >= 30, "urgent steps were sent (and, where the worker jumps, run before a held step)"


def test_high_priority_takes_the_slots_past_the_batch_limit_and_no_other_class_does() -> None:
    scheduler, worker, _ = make_scheduler(max_running_requests=2, high_priority_slots=1)
    add(scheduler, "b1", prompt_of(3, 10), max_tokens=20, priority="background", arrival=1.0)
    add(scheduler, "b2", prompt_of(3, 50), max_tokens=20, priority="background", arrival=1.5)
    step_once(scheduler, worker)
    add(scheduler, "n", prompt_of(3, 90), max_tokens=5, arrival=2.0)
    add(scheduler, "h1", prompt_of(3, 200), max_tokens=5, priority="high", arrival=3.0)
    step_once(scheduler, worker)
    assert sorted(running_ids(scheduler)) == ["b1", "b2", "h1"] and scheduler.num_preemptions == 0
    step_once(scheduler, worker)
    assert "n" not in running_ids(scheduler), "a normal request waits for a slot within the batch limit"
    add(scheduler, "h2", prompt_of(3, 300), max_tokens=5, priority="high", arrival=4.0)
    step_once(scheduler, worker)
    assert sorted(running_ids(scheduler)) == ["b1", "h1", "h2"], "past the reserve, high pushes out background"
    assert scheduler.num_preemptions == 1


def test_an_urgent_step_takes_only_high_priority_requests_with_no_token_in_flight() -> None:
    scheduler, worker, _ = make_scheduler(max_running_requests=2, high_priority_slots=2)
    add(scheduler, "b", prompt_of(5), max_tokens=20, priority="background")
    step_once(scheduler, worker)
    assert scheduler.schedule_urgent() is None, "nothing waiting"
    add(scheduler, "n", prompt_of(5, 50), max_tokens=20, arrival=2.0)
    assert scheduler.schedule_urgent() is None, "only high priority"
    add(scheduler, "h", prompt_of(5, 90), max_tokens=20, priority="high", arrival=3.0)
    scheduler.requests["h"].num_pending_samples = 1  # as if preempted with its token in flight
    assert scheduler.schedule_urgent() is None
    scheduler.requests["h"].num_pending_samples = 0
    urgent = scheduler.schedule_urgent()
    assert urgent is not None and urgent.batch.urgent and [r.request_id for r in urgent.sampled] == ["h"]
    assert running_ids(scheduler) == ["b", "h"] and [r.request_id for r in scheduler.waiting] == ["n"]
