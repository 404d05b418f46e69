"""The engine's step loop: schedule, send to the worker, read back, turn into outputs.

With overlap on, step N+1 is sent before step N's tokens are read, so the worker never
waits for the scheduler; `--disable-overlap` reads every step back before the next.
The server sends step N+1 only shortly before step N is due to end (`submit_due`, timed by
send_timing.py): a request that arrives while a long step runs then gets into the next step,
not the one after it; steps shorter than the host work a step needs are sent at once.

A grammar row of step N+1 whose token of step N is in flight cannot be masked when N+1 is sent: the
worker runs N+1's forward and waits with its sampling for a GrammarMask, which goes out as soon as
step N's tokens are in. A worker in its own process has step N+2 by then: while the newest step in flight
waits for a late mask, one more step may go out behind it (three in flight), which the worker stages and
holds, and launches as soon as N+1's sampling is (N+2's forward reads N+1's tokens). So once N's tokens
are in, only the results and the mask stand between the device and its next step; N+2's scheduling and
staging ran while the device computed. The price: N+2 is due when N+1 is (both are timed against N's end), so
a request that arrives meanwhile joins N+3, one step later than without grammars; and a request that ended in
N has a wasted row in N+2 as well as in N+1. A worker in the engine's process (the offline API) would do the
same work on the same thread, which is the device's bottleneck there either way: there the pipeline
stays at two steps and the mask goes out before the next step is scheduled.
Either way constrained requests still decode every step (having them sit out every other step,
waiting for their token, would halve their throughput).

Speculative decoding pauses the overlap: a step's drafts continue the tokens of the step before, and
how many of a request's drafts are accepted is known only once its step is back. While the scheduler
may draft (`Scheduler.speculation_wanted`: few enough running requests, one of them speculating), a
step is sent only into an empty pipeline; the host's scheduling and result handling then add to every
step's time (the cost in docs/performance.md). Above `speculative_max_batch_size`, or once every
request's speculation is off, the overlap is back.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from sfllm.config import SchedulerConfig, with_device_defaults
from sfllm.engine.send_timing import HOLD_MIN_STEP_S, URGENT_MARGIN_S, SendTiming
from sfllm.loop_time import LoopTime
from sfllm.messages import (ForwardBatch, ForwardResult, GenerateRequest, GrammarMask, RequestOutput, TokenizerSpec,
                            WorkerReady)
from sfllm.nvtx import nvtx_range
from sfllm.scheduler.grammar_matchers import GrammarMatchers
from sfllm.scheduler.scheduler import ScheduledStep, Scheduler

logger = logging.getLogger(__name__)

# how often a loop with nothing to run but a grammar being built looks again
GRAMMAR_POLL_S = 0.0005


class WorkerHandle(Protocol):
    info: WorkerReady
    # True when the worker runs in another process: it stages a step while the engine fills a grammar mask
    in_own_process: bool

    def submit(self, batch: ForwardBatch) -> None: ...

    def send_grammar_mask(self, mask: GrammarMask) -> None: ...

    def collect(self) -> ForwardResult: ...


class EngineCore:
    def __init__(self, config: SchedulerConfig, worker: WorkerHandle, tokenizer: TokenizerSpec | None = None,
                 clock: Callable[[], float] = time.perf_counter, grammars: GrammarMatchers | None = None) -> None:
        """`tokenizer`: the model's, for grammars (None: requests with a structured output are refused).
        `grammars`: built from it beforehand (while the worker loaded), used where built for the worker's
        vocabulary and end tokens."""
        info = worker.info
        config = with_device_defaults(config, info.device_type)
        self.config = config
        self.worker = worker
        if tokenizer is None:
            grammars = None
        elif grammars is None or not grammars.built_for(info.vocab_size, info.eos_token_ids):
            grammars = GrammarMatchers(tokenizer.tokenizer_json, info.vocab_size, info.eos_token_ids)
        self.scheduler = Scheduler(config, info.num_kv_blocks, info.num_cpu_kv_blocks, info.max_context_length,
                                   info.eos_token_ids, grammars=grammars, vocab_size=info.vocab_size)
        self.loop_time: LoopTime | None = None  # the engine process's: grammar masks are charged to it
        self._in_flight: deque[ScheduledStep] = deque()
        self._clock = clock
        self.num_steps = 0
        self.last_step_time_s = 0.0
        self.last_batch_size = 0
        self._last_collect = clock()
        self._running_since = self._last_collect  # when the oldest step in flight started on the worker
        self.send_timing = SendTiming()
        self.gpu_memory = (0, 0)  # (allocated, reserved) in the worker, as of the last step

    def add_request(self, request: GenerateRequest, client_id: str = "") -> RequestOutput | None:
        return self.scheduler.add_request(request, client_id)

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        return self.scheduler.abort_requests(request_ids)

    def abort_client(self, client_id: str) -> list[RequestOutput]:
        return self.scheduler.abort_client(client_id)

    def has_work(self) -> bool:
        return bool(self._in_flight) or self.scheduler.has_unfinished()

    def pipeline_depth(self) -> int:
        """How many steps may be in flight now: one without overlap, two with it, and three while the newest
        waits for a late grammar mask and the worker, in its own process, stages the next step meanwhile."""
        if self.config.disable_overlap:
            return 1
        if self.worker.in_own_process and self._in_flight and self._in_flight[-1].mask_late:
            return 3
        return 2

    def submit_next(self) -> bool:
        """Schedules and sends one step if the pipeline has room; True if it sent one."""
        if self._num_regular_in_flight() >= self.pipeline_depth():
            return False  # (an urgent step is not counted: the device needs the next step behind it)
        if self._in_flight and self.scheduler.speculation_wanted():
            return False
        started = self._clock()
        with nvtx_range("schedule"):
            scheduled = self.scheduler.schedule()
        if self.loop_time is not None:
            self.loop_time.lap("scheduling")
        if scheduled is None:
            return False
        if scheduled.grammar_requests and not scheduled.mask_late:
            scheduled.batch.grammar_mask = self._grammar_mask(scheduled, "scheduling")
        self._hold(scheduled)
        self.worker.submit(scheduled.batch)
        now = self._clock()
        scheduled.schedule_s = now - started
        if not self._in_flight:
            self._running_since = now
        self._in_flight.append(scheduled)
        self.last_batch_size = len(scheduled.batch.slots)
        return True

    def _num_regular_in_flight(self) -> int:
        return sum(not step.batch.urgent for step in self._in_flight)

    def _hold(self, scheduled: ScheduledStep) -> None:
        """Lets the worker hold the step until the one in flight ends or is expected to (send_timing.py), where
        that one is long, neither waits for a grammar mask, a high-priority request came lately, and an urgent
        step could be built (a free slot and a free block)."""
        now = self._clock()
        if (not self.worker.info.holds_steps or len(self._in_flight) != 1 or scheduled.grammar_requests
                or self._in_flight[0].grammar_requests
                or not self.scheduler.high_priority_lately()
                or not self.scheduler.has_room_for_urgent()):
            return
        expected = self.send_timing.expected_duration_s(self._in_flight[0].num_tokens)
        hold_s = self._running_since + expected - now
        if expected >= HOLD_MIN_STEP_S and hold_s > 0:
            scheduled.batch.hold_s = hold_s
            scheduled.held_until = now + hold_s

    def submit_urgent(self) -> bool:
        """Sends the waiting high-priority requests' prompts as a step of their own
        (`Scheduler.schedule_urgent`) while the worker still holds the newest step: their first token then
        waits for the step in flight alone, not for the held one too. True if it sent one."""
        if (len(self._in_flight) < 2 or self._clock() > self._in_flight[1].held_until - URGENT_MARGIN_S
                or not self.scheduler.waiting.num_waiting("high")):
            return False
        started = self._clock()
        scheduled = self.scheduler.schedule_urgent()
        if scheduled is None:
            return False
        self.worker.submit(scheduled.batch)
        now = self._clock()
        scheduled.schedule_s = now - started
        held = self._in_flight[1]
        self._in_flight.append(scheduled)
        logger.debug("urgent step %d: %d high-priority requests, %d tokens, sent %.1f ms before the hold of step %d "
                     "ends", scheduled.batch.step_id, len(scheduled.batch.slots), scheduled.num_tokens,
                     1e3 * (held.held_until - now), held.batch.step_id)
        return True

    def seconds_until_due(self) -> float:
        """Seconds until the next step should be sent (0 or less: now). Into an empty pipeline at once,
        else the send-ahead time before the oldest step in flight is expected to end (a third step, behind one
        that waits for its grammar mask, is due when the second was)."""
        if not self._in_flight:
            return 0.0
        expected = self.send_timing.expected_duration_s(self._in_flight[0].num_tokens)
        return self._running_since + expected - self.send_ahead_s() - self._clock()

    def send_ahead_s(self) -> float:
        """How long before the step in flight ends the next is sent: the host time of steps like the newest."""
        newest = next((step.num_tokens for step in reversed(self._in_flight) if not step.batch.urgent), 0)
        return self.send_timing.send_ahead_s(newest)

    def submit_due(self) -> bool:
        """`submit_next`, but a step goes behind the one in flight only once that is about to end."""
        if self.seconds_until_due() > 0:
            return False
        return self.submit_next()

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def complete(self, result: ForwardResult) -> list[RequestOutput]:
        """Turns a step's result into request outputs: the oldest step's, or an urgent step's that the worker
        ran before a step it held."""
        scheduled = next((s for s in self._in_flight if s.batch.step_id == result.step_id), None)
        if scheduled is None or (scheduled is not self._in_flight[0] and not scheduled.batch.urgent):
            raise RuntimeError(f"worker answered step {result.step_id}, expected {self._in_flight[0].batch.step_id}"
                               if self._in_flight else f"worker answered step {result.step_id}, none in flight")
        self._in_flight.remove(scheduled)
        now = self._clock()
        self.last_step_time_s = now - self._last_collect
        self._last_collect = now
        self.send_timing.record(scheduled.num_tokens, now - self._running_since,
                                scheduled.schedule_s, result.launch_time_s)
        self._running_since = now  # the next step in flight, if any, starts now
        self.num_steps += 1
        self.gpu_memory = (result.gpu_memory_allocated, result.gpu_memory_reserved)
        if logger.isEnabledFor(logging.DEBUG):
            batch = scheduled.batch
            single = sum(1 for n in batch.num_new_tokens if n == 1)
            logger.debug("step %d: %d sequences of one new token, %d tokens in %d longer ones; worker %.2f ms, "
                         "%.2f ms since the last step; host time before its launch: scheduling %.2f ms, the worker's "
                         "%.2f ms", batch.step_id, single, sum(batch.num_new_tokens) - single,
                         len(batch.slots) - single, 1e3 * result.forward_time_s, 1e3 * self.last_step_time_s,
                         1e3 * scheduled.schedule_s, 1e3 * result.launch_time_s)
        outputs = self.scheduler.process_result(scheduled, result)
        # the next step's grammar rows waited for these tokens: its mask goes out now
        if self._in_flight and self._in_flight[0].mask_late:
            following = self._in_flight[0]
            following.mask_late = False
            mask = self._grammar_mask(following, "results")
            self.worker.send_grammar_mask(GrammarMask(step_id=following.batch.step_id, bitmask=mask))
        return outputs

    def _grammar_mask(self, step: ScheduledStep, phase_before: str) -> memoryview:
        if self.loop_time is not None:
            self.loop_time.lap(phase_before)
        mask = self.scheduler.grammar_mask(step)
        if self.loop_time is not None:
            self.loop_time.lap("grammar masks")
        return mask

    def step(self) -> list[RequestOutput]:
        """One turn of the blocking loop: send a step if there is room, then read back the oldest
        once the pipeline is full or nothing more can be sent."""
        submitted = self.submit_next()
        if not self._in_flight and self.scheduler.grammars_compiling():
            time.sleep(GRAMMAR_POLL_S)  # the grammar's thread needs the GIL now and then: no busy loop
        if not self._in_flight or (submitted and len(self._in_flight) < self.pipeline_depth()):
            return []
        result = self.worker.collect()
        if self.loop_time is not None:
            self.loop_time.lap("waiting for the worker")
        outputs = self.complete(result)
        if self.loop_time is not None:
            self.loop_time.lap("results")
        return outputs
