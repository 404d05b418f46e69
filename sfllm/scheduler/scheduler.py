"""Decides each step's batch and turns the worker's tokens into request outputs.

A step holds, within the token budget: decodes and prefill chunks of running requests
(high priority first), then newly admitted requests; until a high-priority request has its
first token, only high-priority work. A request preempted for its slot alone is paused: it
keeps its KV blocks and resumes with a decode. The scheduler may send step N+1
before step N's tokens are back: a decode whose input token is still in flight is sent
as -1 and the worker substitutes the token it sampled last for that slot. With speculative decoding a
decode may carry drafts (sfllm/scheduler/speculation.py): its row verifies them, and once the step is
back the request keeps the KV of its accepted tokens only.

High priority has `high_priority_slots` slots past the batch limit, so that under a full batch it pushes out
no one for a slot; and a high-priority arrival may get a step of its own (`schedule_urgent`) that the worker
runs before the newest step, which it holds until the step before ends (or is expected to). Within a minute of a
high-priority arrival, a step that carries none of its prompts keeps to `high_priority_step_tokens`, so that the next
arrival waits behind a short step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sfllm.config import SchedulerConfig, num_sequence_slots
from sfllm.messages import (BlockTableUpdate, ForwardBatch, ForwardResult, GenerateRequest, PromptLogprobTargets,
                            RequestOutput, SampledLogprobs, SequenceSampling)
from sfllm.sampling_params import InvalidSamplingParams, SamplingParams, StructuredOutput, token_outside_vocabulary
from sfllm.scheduler.block_allocator import BlockAllocator, SwapSpace
from sfllm.scheduler.grammar_matchers import GrammarMatchers, accepts, exceeded_limits
from sfllm.scheduler.preemption import choose_victim, may_push_out
from sfllm.scheduler.priority import PRIORITY_RANK
from sfllm.scheduler.request import Request, RequestStatus
from sfllm.scheduler.speculation import Speculation
from sfllm.scheduler.stop_checker import StopChecker
from sfllm.scheduler.waiting_queue import QUEUE_FULL_STATUS, WaitingQueue
from sfllm.structured_output import CONSTRAINT_PARAM

logger = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 10.0
# High priority came lately: within this long of its last arrival. Then steps without its prompts are kept to
# `high_priority_step_tokens`, and the engine holds long steps for urgent ones (sfllm/engine/send_timing.py), so
# that the next arrival waits behind a short step; requests of an interactive user come closer together than
# this, and a server without that traffic pays nothing.
HIGH_PRIORITY_LATELY_S = 60.0


@dataclass
class ScheduledStep:
    batch: ForwardBatch
    sampled: list[Request]
    # the requests of the batch's grammar rows, in order; the step's mask is late (a GrammarMask follows
    # the batch) when one of them had a token in flight as the step was built
    grammar_requests: list[Request] = field(default_factory=list)
    mask_late: bool = False
    # the requests of the batch's prompt_logprobs entries, with the prompt position of their first target
    prompt_logprob_requests: list[tuple[Request, int]] = field(default_factory=list)
    schedule_s: float = 0.0  # the engine's host time to build and send it
    held_until: float = 0.0  # by the engine's clock, when the worker launches it at the latest, if it holds it

    @property
    def num_tokens(self) -> int:
        """Tokens the step computes: every row's new tokens, drafts included (the sum of num_new_tokens)."""
        return len(self.batch.input_token_ids)


@dataclass
class PrefixCacheStats:
    """Prefix-cache use in tokens, counted when a request is admitted (not on failed attempts)."""
    queries: int = 0               # tokens looked up: whole blocks before each sequence's last token
    hits: int = 0                  # of those, found cached
    prompt_tokens: int = 0         # prompt tokens of requests admitted for the first time
    cached_prompt_tokens: int = 0  # of those, served from the cache


@dataclass
class _StepBuilder:
    step_id: int
    budget: int
    requests: list[Request] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    input_token_ids: list[int] = field(default_factory=list)
    block_table_updates: list[BlockTableUpdate] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    new_sequences: list[SequenceSampling] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    grammar_rows: list[int] = field(default_factory=list)
    grammar_requests: list[Request] = field(default_factory=list)
    mask_late: bool = False
    min_tokens_rows: list[int] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobTargets] = field(default_factory=list)
    prompt_logprob_requests: list[tuple[Request, int]] = field(default_factory=list)
    num_draft_tokens: list[int] = field(default_factory=list)
    num_sampled_rows: int = 0  # rows of logits so far: one per sampled sequence, plus one per draft

    def build(self) -> ScheduledStep:
        batch = ForwardBatch(step_id=self.step_id, slots=self.slots, num_new_tokens=self.num_new_tokens,
                             context_lens=self.context_lens, input_token_ids=self.input_token_ids,
                             sample=self.sample, block_table_updates=self.block_table_updates,
                             new_sequences=self.new_sequences, swap_out=self.swap_out, swap_in=self.swap_in,
                             grammar_rows=self.grammar_rows, min_tokens_rows=self.min_tokens_rows,
                             prompt_logprobs=self.prompt_logprobs,
                             num_draft_tokens=self.num_draft_tokens if any(self.num_draft_tokens) else [])
        return ScheduledStep(batch, [r for r, s in zip(self.requests, self.sample) if s], self.grammar_requests,
                             self.mask_late, self.prompt_logprob_requests)


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_blocks: int, num_cpu_blocks: int, max_context_length: int,
                 eos_token_ids: list[int], clock: Callable[[], float] = time.monotonic,
                 grammars: GrammarMatchers | None = None, vocab_size: int | None = None) -> None:
        self.config = config
        self.block_size = config.block_size
        self.max_context_length = max_context_length
        self.allocator = BlockAllocator(num_blocks, config.block_size, not config.disable_prefix_cache)
        self.swap_space = SwapSpace(num_cpu_blocks)
        self.waiting = WaitingQueue(config.schedule_policy, config.background_share, config.max_background_wait_s,
                                    config.max_waiting_requests)
        self.running: list[Request] = []
        self._running_unsorted = False
        self.requests: dict[str, Request] = {}
        self.stop_checker = StopChecker(eos_token_ids, max_context_length)
        self.grammars = grammars  # None: no tokenizer for grammars (a constrained request is refused)
        self.vocab_size = vocab_size
        self._free_slots = list(range(num_sequence_slots(config) - 1, -1, -1))
        self._num_slot_releases = 0  # a running count, as the allocator's num_frees
        # What an urgent step must leave alone, as of the newest `schedule`: the blocks it offered to the prefix
        # cache (their KV is that step's to compute), and the counts of released blocks and slots then (one
        # released since may still be that step's to write).
        self._blocks_filled_by_newest_step: set[int] = set()
        self._releases_at_newest_step = (0, 0)
        self._clock = clock
        self._step_id = 0
        self.num_preemptions = 0
        self.prefix_stats = PrefixCacheStats()
        self.speculation = Speculation(config, max_context_length)
        self._last_stats_log = clock()
        self._high_priority_arrival = -float("inf")  # the last one's, by the clock

    # ---- requests in and out ------------------------------------------------------------

    def add_request(self, message: GenerateRequest, client_id: str = "") -> RequestOutput | None:
        """Queues the request; returns an error output instead when it can never run, or when the queue is full."""
        refused = self.refusal(message, check_grammar=False)  # the grammar is checked as it is compiled, below
        if refused is not None:
            return refused
        full = self.waiting.full_message(message.priority)  # before the grammar's compile, which a refusal wastes
        if full is not None:
            return _error(message.request_id, f"{full}; retry later", QUEUE_FULL_STATUS)
        try:
            matcher_ready = self._compile_grammar(message.params)
        except InvalidSamplingParams as error:
            return _error(message.request_id, str(error), 400, error.param)
        request = Request(message.request_id, client_id, list(message.prompt_token_ids), message.params,
                          message.priority, message.arrival_time or time.time(), matcher_ready=matcher_ready,
                          prefix_root=BlockAllocator.salted_root(message.cache_salt))
        if message.params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * (len(message.prompt_token_ids) - 1)
        self.waiting.add(request, self._clock())  # room checked above
        self.requests[request.request_id] = request
        if request.priority == "high":
            self._high_priority_arrival = self._clock()
        return None

    def refusal(self, message: GenerateRequest, check_grammar: bool = True) -> RequestOutput | None:
        """The error output (a 400) of a request that can never run, or None; queues nothing. A caller holding many
        requests (LLM.generate) checks them all before it adds any."""
        if message.request_id in self.requests:
            return _error(message.request_id, f"request id {message.request_id!r} is already in use", 400)
        prompt_len = len(message.prompt_token_ids)
        if prompt_len == 0:
            return _error(message.request_id, "the prompt is empty", 400)
        if prompt_len >= self.max_context_length:
            return _error(message.request_id, f"the prompt has {prompt_len} tokens, but the context length is "
                                              f"{self.max_context_length}: it must be shorter", 400)
        if message.priority not in PRIORITY_RANK:
            return _error(message.request_id, f"priority must be one of {', '.join(PRIORITY_RANK)}", 400)
        # the embedding would fail on an id past the vocabulary (the worker's step with it) and wrap a negative one
        outside = None if self.vocab_size is None else token_outside_vocabulary(message.prompt_token_ids,
                                                                                 self.vocab_size)
        if outside is not None:
            return _error(message.request_id, f"the prompt holds token id {outside}, outside the vocabulary "
                                              f"[0, {self.vocab_size})", 400)
        try:
            if self.vocab_size is not None:
                message.params.check_vocabulary(self.vocab_size)
            if check_grammar and message.params.structured_output is not None:
                self._check_grammar(message.params.structured_output)
        except InvalidSamplingParams as error:
            return _error(message.request_id, str(error), 400, error.param)
        params = message.params
        if params.allowed_token_ids is not None and params.min_tokens > 0 and set(params.allowed_token_ids) <= (
                self.stop_checker.eos_token_ids | set(params.stop_token_ids)):
            return _error(message.request_id, "every token of allowed_token_ids ends the output, which min_tokens "
                                              "forbids for its first tokens: nothing is left to draw", 400,
                          "allowed_token_ids")
        return None

    def high_priority_lately(self) -> bool:
        return self._clock() - self._high_priority_arrival <= HIGH_PRIORITY_LATELY_S

    def _compile_grammar(self, params: SamplingParams) -> Any:
        if params.structured_output is None:
            return None
        return self._available_grammars().compile(params.structured_output)

    def _check_grammar(self, structured_output: StructuredOutput) -> None:
        self._available_grammars().check(structured_output)

    def _available_grammars(self) -> GrammarMatchers:
        if self.grammars is None:
            raise InvalidSamplingParams("response_format", "this engine was started without a tokenizer for "
                                                           "grammars: structured outputs are not available")
        return self.grammars

    def grammars_compiling(self) -> bool:
        """Whether a waiting request waits only for its grammar's matcher: a loop with nothing else to do
        should look again soon."""
        return any(r.matcher_ready is not None for r in self.waiting)

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and not request.is_finished:
                outputs.append(self._finish(request, "abort"))
        return outputs

    def abort_client(self, client_id: str) -> list[RequestOutput]:
        return self.abort_requests([r.request_id for r in self.requests.values() if r.client_id == client_id])

    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # ---- scheduling ---------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        now = self._clock()
        step = _StepBuilder(self._step_id, self.config.max_running_tokens)
        filled_before, self._blocks_filled_by_newest_step = self._blocks_filled_by_newest_step, set()
        self._make_room_for_high_priority(now, step)
        # Until high priority has its first token, its steps are its own: other requests (aged ones
        # too) sit out, so that its prefill step is as short as the request alone.
        high_first = (self.waiting.num_waiting("high") > 0
                      or any(r.priority == "high" and r.is_prefilling for r in self.running))
        if not high_first and self.high_priority_lately():
            step.budget = min(step.budget, self.config.high_priority_step_tokens or step.budget)
        if self._running_unsorted:  # (a request's rank is fixed while it runs: only admissions unsort the list)
            self.running.sort(key=lambda r: (r.rank, r.arrival_time))
            self._running_unsorted = False
        speculate = self.speculation.active(len(self.running))
        scheduled: set[int] = set()
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted while this loop made room for another
            if high_first and request.priority != "high":
                continue
            if not speculate and self._add_plain_decode(step, request):
                scheduled.add(id(request))
                continue
            num_new = self._num_new_tokens(request, step.budget)
            if num_new == 0:
                continue
            drafts = self._drafts(request, num_new, step.budget) if speculate else []
            if not self._reserve_blocks(request, num_new + len(drafts), scheduled, step):
                continue
            self._add_to_step(step, request, num_new, drafts)
            scheduled.add(id(request))
        self._admit_waiting(step, now, high_first)
        if not step.requests and not step.swap_out:
            self._blocks_filled_by_newest_step = filled_before  # (no step: the newest is still the one before)
            return None
        self._step_id += 1
        self._releases_at_newest_step = (self.allocator.num_frees, self._num_slot_releases)
        if now - self._last_stats_log >= STATS_LOG_INTERVAL_S:
            self._last_stats_log = now
            self.log_stats()
        return step.build()

    def schedule_urgent(self) -> ScheduledStep | None:
        """A step of waiting high-priority requests' prompts alone, which the worker may run before the
        newest step `schedule` built (held, not yet launched) or after it: either way correct, because it takes
        no slot or block released since that step was built (the step may still write it), and no cached
        block whose KV that step computes. None when no request can go so, or a release since makes it unsafe:
        they wait for the next step, as they would without it. Requests with a grammar, a paused or swapped
        KV or a token in flight take the next step too, and so do those from the first that does not fit (in the
        token budget, the slots or the free blocks) on."""
        if (self.allocator.num_frees, self._num_slot_releases) != self._releases_at_newest_step:
            return None
        step = _StepBuilder(self._step_id, self.config.max_running_tokens)
        for request in self.waiting.ranked_high(self._clock()):
            if (request.priority != "high" or request.status is not RequestStatus.WAITING or request.block_ids
                    or request.num_pending_samples or request.matcher is not None
                    or request.matcher_ready is not None):
                continue
            # first come, first served among those that may go; one longer than the budget (what is left of
            # it) goes by the next regular step, which shares its whole cached prefix
            if request.num_tokens > step.budget or not self._free_slots:
                break
            # every block of the prompt, cached ones included, must be free: a cached block it shares may come
            # off the free list, and giving one back would be a release (the check above)
            prompt_blocks = -(-request.num_tokens // self.block_size)
            if prompt_blocks > self.allocator.num_free:
                break
            looked_up = 0
            if self.allocator.enable_prefix_cache and request.prompt_logprobs is None:
                max_cached = self._max_cached_blocks(request)
                request.block_ids, request.block_hashes = self.allocator.match_prefix(
                    request.token_slice(0, request.num_tokens), max_cached, self._blocks_filled_by_newest_step,
                    request.prefix_root)
                request.num_computed_tokens = len(request.block_ids) * self.block_size
                looked_up = max_cached * self.block_size
            num_new = request.num_tokens - request.num_computed_tokens
            request.block_ids.extend(self.allocator.allocate(self._blocks_needed(request, num_new)))
            self._count_prefix_use(request, looked_up)
            self.waiting.remove(request)
            self._start_running(request)
            self._add_to_step(step, request, num_new)
        if not step.requests:
            return None
        self._step_id += 1
        scheduled = step.build()
        scheduled.batch.urgent = True
        return scheduled

    def has_room_for_urgent(self) -> bool:
        """Whether a slot and a block are free: what an urgent step needs first."""
        return bool(self._free_slots) and self.allocator.num_free > 0

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        """Tokens to compute for a running request this step; 0 when it should sit out."""
        if budget <= 0 or request.num_drafts_in_flight:
            return 0
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining > 0:
            return min(remaining, budget)
        # decoding: stop sending steps once the steps in flight already reach a limit
        if request.num_pending_samples == 0:
            return 0
        if request.num_outputs_committed >= request.params.max_tokens:
            return 0
        if request.num_computed_tokens + 1 > self.max_context_length:
            return 0
        return 1

    def _drafts(self, request: Request, num_new: int, budget: int) -> list[int]:
        """Drafts for a decode of the request's last known token, if it speculates: as many as fit in its KV
        blocks and the free ones (drafts never preempt anyone)."""
        if num_new != 1:
            return []
        if not self.speculation.eligible(request):
            self.speculation.count_step(request)
            return []
        if request.num_pending_samples or request.num_tokens - request.num_computed_tokens != 1:
            return []
        room = (len(request.block_ids) + self.allocator.num_free) * self.block_size - request.num_computed_tokens
        return self.speculation.drafts(request, budget, room)

    def speculation_wanted(self) -> bool:
        """Whether the next step may carry drafts: then it waits for the step in flight, whose tokens its
        drafts continue (EngineCore pauses the overlap)."""
        speculation = self.speculation
        return (speculation.active(len(self.running))
                and any(speculation.eligible(r) and not r.is_prefilling for r in self.running))

    def _blocks_needed(self, request: Request, num_new: int) -> int:
        total = request.num_computed_tokens + num_new
        return max(-(-total // self.block_size) - len(request.block_ids), 0)

    def _reserve_blocks(self, request: Request, num_new: int, scheduled: set[int], step: _StepBuilder) -> bool:
        """Allocates the request's new blocks, preempting unscheduled lower requests if needed."""
        needed = self._blocks_needed(request, num_new)
        if needed == 0:  # most decodes: the last block has room
            return True
        self._release_paused_blocks(needed)
        while needed > self.allocator.num_free:
            victim = choose_victim([r for r in self.running if id(r) not in scheduled])  # includes `request`
            self._preempt(victim, step)
            if victim is request:
                return False
        request.block_ids.extend(self.allocator.allocate(needed))
        return True

    def _make_room_for_high_priority(self, now: float, step: _StepBuilder) -> None:
        """Preempts lower-class running requests while waiting high-priority ones lack a slot or blocks."""
        high = [r for r in self.waiting.ranked_high(now) if r.num_pending_samples == 0]
        high_slots_needed = other_slots_needed = blocks_needed = 0
        counted: set[int] = set()
        for request in high:
            if request.priority == "high":
                high_slots_needed += 1
            else:
                other_slots_needed += 1  # aged background: within the batch limit
            blocks_needed += self._free_blocks_to_start(request, self.config.max_running_tokens, counted)
            self._release_paused_blocks(blocks_needed)
            while (high_slots_needed + other_slots_needed > len(self._free_slots)
                   or 0 < other_slots_needed > self._batch_room() - high_slots_needed
                   or blocks_needed > self.allocator.num_free):
                victim = choose_victim(r for r in self.running if may_push_out(request, r))
                if victim is None:
                    return
                self._preempt(victim, step, keep_blocks=blocks_needed <= self.allocator.num_free)

    def _free_blocks_to_start(self, request: Request, budget: int, counted: set[int]) -> int:
        """Free blocks a waiting request takes when `_admit` starts it with a chunk of up to `budget` tokens: its
        new ones, and the cached blocks of its prefix that are free now, which come off the free list with it
        (`counted`: those already counted for requests before it). Counting only the chunk's blocks, a prompt
        longer than the chunk whose cached head sat in the free blocks was never admitted, and the requests its
        wait held up never freed any. A prompt that fits in the chunk takes at most its own blocks, cached or
        not: no lookup (hundreds of aged requests may wait)."""
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining <= budget or not self._uses_prefix_cache(request):
            return self._blocks_needed(request, min(remaining, budget))
        cached, _ = self.allocator.cached_prefix(request.token_slice(0, request.num_tokens),
                                                 self._max_cached_blocks(request), root=request.prefix_root)
        taken = [block for block in cached if self.allocator.is_free(block) and block not in counted]
        counted.update(taken)
        computed = len(cached) * self.block_size
        total = computed + min(request.num_tokens - computed, budget)
        return len(taken) + -(-total // self.block_size) - len(cached)

    def _uses_prefix_cache(self, request: Request) -> bool:
        """Whether `_admit` looks the request's prompt up in the prefix cache: a start from nothing, without
        prompt logprobs (they need the logits of every prompt position, which cached blocks do not keep)."""
        return (request.status is not RequestStatus.SWAPPED and request.num_computed_tokens == 0
                and not request.block_ids and self.allocator.enable_prefix_cache
                and request.prompt_logprobs is None)

    def _max_cached_blocks(self, request: Request) -> int:
        """The most prompt blocks a start may take from the prefix cache: its last token is always computed, for
        the logits of the first output token."""
        return (request.num_tokens - 1) // self.block_size

    def _batch_room(self) -> int:
        """Requests that may still start within the batch limit: what any class but high may take."""
        return self.config.max_running_requests - len(self.running)

    def _release_paused_blocks(self, needed: int) -> None:
        """Releases paused requests' KV, the lowest class and newest first, until `needed` blocks are free:
        running work and high priority come before a paused request's KV, which it will recompute."""
        while needed > self.allocator.num_free:
            victim = choose_victim(r for r in self.waiting if r.is_paused)
            if victim is None:
                return
            self._release_blocks(victim)

    def _admit_waiting(self, step: _StepBuilder, now: float, high_first: bool) -> None:
        # high priority may take every free slot, the other classes what the batch limit leaves
        free_slots = min(len(self._free_slots), max(self._batch_room(), 0) + self.waiting.num_waiting("high"))
        for request in self.waiting.candidates(now, free_slots):
            if step.budget <= 0 or not self._free_slots:
                break
            if request.num_pending_samples:
                continue  # preempted with a step in flight: its tokens must come back first
            if request.matcher_ready is not None:
                if not request.matcher_ready.done():
                    continue  # its grammar's matcher is still being built
                request.matcher, request.matcher_ready = request.matcher_ready.result(), None
            if request.priority != "high" and (high_first or self._batch_room() <= 0):
                continue
            admitted = self._admit(request, step)
            if not admitted and self.config.schedule_policy == "fcfs":
                break

    def _admit(self, request: Request, step: _StepBuilder) -> bool:
        if request.status is RequestStatus.SWAPPED:
            return self._swap_in(request, step)
        looked_up = 0
        if self._uses_prefix_cache(request):
            max_cached = self._max_cached_blocks(request)
            blocks, hashes = self.allocator.match_prefix(request.token_slice(0, request.num_tokens), max_cached,
                                                         root=request.prefix_root)
            request.block_ids, request.block_hashes = blocks, hashes
            request.num_computed_tokens = len(blocks) * self.block_size
            looked_up = max_cached * self.block_size
        num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
        needed = self._blocks_needed(request, num_new)
        if needed > self.allocator.num_free:
            self._release_blocks(request)
            return False
        request.block_ids.extend(self.allocator.allocate(needed))
        self._count_prefix_use(request, looked_up)
        self.waiting.remove(request)
        self._start_running(request)
        self._add_to_step(step, request, num_new)
        return True

    def _count_prefix_use(self, request: Request, looked_up: int) -> None:
        stats = self.prefix_stats
        stats.queries += looked_up
        stats.hits += request.num_computed_tokens if looked_up else 0
        if request.num_preemptions == 0:
            request.num_cached_tokens = request.num_computed_tokens
            stats.prompt_tokens += len(request.prompt_token_ids)
            stats.cached_prompt_tokens += request.num_cached_tokens

    def _start_running(self, request: Request) -> None:
        request.aged = request.aged or self.waiting.is_aged(request, self._clock())
        request.status = RequestStatus.RUNNING
        request.slot = self._free_slots.pop()
        request.num_blocks_sent = 0  # the worker's table for this slot is someone else's until sent
        request.needs_sampling_state = True
        if request.first_scheduled_time is None:
            request.first_scheduled_time = self._clock()
        self.running.append(request)
        self._running_unsorted = True

    def _swap_in(self, request: Request, step: _StepBuilder) -> bool:
        num_blocks = len(request.swapped_block_ids)
        decode = 1 if request.num_computed_tokens < request.num_tokens else 0
        needed = num_blocks + self._blocks_needed_after_swap(request, decode)
        if needed > self.allocator.num_free or step.budget < 1:
            return False
        request.block_ids = self.allocator.allocate(num_blocks)
        step.swap_in.extend(zip(request.swapped_block_ids, request.block_ids))
        self.swap_space.free(request.swapped_block_ids)
        request.swapped_block_ids = []
        self.waiting.remove(request)
        self._start_running(request)
        num_new = self._num_new_tokens(request, step.budget)
        if num_new:
            request.block_ids.extend(self.allocator.allocate(self._blocks_needed(request, num_new)))
            self._add_to_step(step, request, num_new)
        return True

    def _blocks_needed_after_swap(self, request: Request, num_new: int) -> int:
        total = request.num_computed_tokens + num_new
        return max(-(-total // self.block_size) - len(request.swapped_block_ids), 0)

    def _add_plain_decode(self, step: _StepBuilder, request: Request) -> bool:
        """Adds the request's row if it is the common case under load, a decode of the token in flight with
        room in its last block and nothing more to send or look at (`_num_new_tokens`, `_reserve_blocks` and
        `_add_to_step` would do the same, at twice the host time); False, adding nothing, otherwise."""
        end = request.num_computed_tokens + 1
        size = self.block_size
        num_blocks = len(request.block_ids)
        outputs = len(request.output_token_ids) + request.num_pending_samples
        if (step.budget <= 0 or request.num_tokens != end - 1 or request.num_pending_samples == 0
                or request.num_drafts_in_flight or request.needs_sampling_state or request.matcher is not None
                or request.prompt_logprobs is not None or end > num_blocks * size
                or num_blocks > request.num_blocks_sent or end > self.max_context_length
                or end >= (len(request.block_hashes) + 1) * size
                or outputs >= request.params.max_tokens or outputs < request.params.min_tokens):
            return False
        step.requests.append(request)
        step.slots.append(request.slot)
        step.num_new_tokens.append(1)
        step.context_lens.append(end)
        step.input_token_ids.append(-1)
        step.sample.append(True)
        step.num_draft_tokens.append(0)
        step.budget -= 1
        step.num_sampled_rows += 1
        request.num_computed_tokens = end
        request.num_pending_samples += 1
        return True

    def _add_to_step(self, step: _StepBuilder, request: Request, num_new: int, drafts: Sequence[int] = ()) -> None:
        """`drafts` follow the decode of the request's last known token (its row grows by them)."""
        start = request.num_computed_tokens
        end = start + num_new
        num_tokens = request.num_tokens
        if start >= num_tokens:  # a decode of a token in flight (the worker has it): the common step
            tokens = [-1] * num_new
        elif end <= num_tokens:
            tokens = request.token_slice(start, end)
        else:
            tokens = request.token_slice(start, num_tokens) + [-1] * (end - num_tokens)
        sample = end >= num_tokens
        tokens.extend(drafts)
        num_new += len(drafts)
        end += len(drafts)
        if request.needs_sampling_state:
            # penalties read the prompt and the output so far, bad words of several tokens the output: a request
            # resumed after a preemption brings them to its new slot
            penalties = request.params.has_penalties
            step.new_sequences.append(SequenceSampling(
                slot=request.slot, params=request.params,
                prompt_token_ids=request.prompt_token_ids if penalties else [],
                output_token_ids=request.output_token_ids if request.params.reads_output_tokens else []))
            request.needs_sampling_state = False
        if sample and request.matcher is not None:
            step.grammar_rows.append(step.num_sampled_rows)
            step.grammar_requests.append(request)
            # its previous token is not back yet: the grammar can only mask this step once it is
            step.mask_late |= request.num_pending_samples > 0
        if sample and request.params.min_tokens:
            # each earlier step in flight brings exactly one token: no drafts before min_tokens (`_drafts`)
            produced = len(request.output_token_ids) + request.num_pending_samples
            step.min_tokens_rows.extend(step.num_sampled_rows + row for row in range(1 + len(drafts))
                                        if produced + row < request.params.min_tokens)
        if request.prompt_logprobs is not None:
            self._add_prompt_logprob_targets(step, request, start, end)
        step.requests.append(request)
        step.slots.append(request.slot)
        step.num_new_tokens.append(num_new)
        step.context_lens.append(end)
        step.input_token_ids.extend(tokens)
        # while a request runs its block_ids only grow: the worker needs the new tail alone
        if len(request.block_ids) > request.num_blocks_sent:
            step.block_table_updates.append(BlockTableUpdate(request.slot, request.num_blocks_sent,
                                                             request.block_ids[request.num_blocks_sent:]))
            request.num_blocks_sent = len(request.block_ids)
        step.sample.append(sample)
        step.num_draft_tokens.append(len(drafts))
        step.budget -= num_new
        request.num_computed_tokens = end
        if sample:
            request.num_pending_samples += 1
            request.num_drafts_in_flight = len(drafts)
            step.num_sampled_rows += 1 + len(drafts)
        registered = len(request.block_hashes)
        self._register_full_blocks(request)
        self._blocks_filled_by_newest_step.update(request.block_ids[registered:len(request.block_hashes)])

    def _add_prompt_logprob_targets(self, step: _StepBuilder, request: Request, start: int, end: int) -> None:
        """Positions start..end-1 predict prompt tokens start+1..end: those within the prompt are targets."""
        prompt = request.prompt_token_ids
        if request.prompt_logprobs is None or request.prompt_logprobs_sent or start + 1 >= len(prompt):
            return
        targets = prompt[start + 1:min(end + 1, len(prompt))]
        step.prompt_logprobs.append(PromptLogprobTargets(len(step.slots), request.params.prompt_logprobs, targets))
        step.prompt_logprob_requests.append((request, start))

    def _register_full_blocks(self, request: Request) -> None:
        """Offers the request's full, computed blocks whose tokens are known to the prefix cache."""
        size = self.block_size
        if request.num_computed_tokens < (len(request.block_hashes) + 1) * size:
            return  # no block filled since the last call: what most decode steps find
        full = min(request.num_computed_tokens, request.num_tokens) // size
        for index in range(len(request.block_hashes), full):
            parent = request.block_hashes[-1] if request.block_hashes else request.prefix_root
            tokens = tuple(request.token_slice(index * size, (index + 1) * size))
            request.block_hashes.append(self.allocator.register(request.block_ids[index], parent, tokens))

    # ---- preemption and finishing -------------------------------------------------------

    def _preempt(self, request: Request, step: _StepBuilder, keep_blocks: bool = False) -> None:
        """Takes a running request out of the batch, back to the head of its queue.

        With `keep_blocks` (only its slot was needed) its KV stays in the pool and it resumes where it
        stopped, with no recompute and no swap; else it is swapped out or its blocks are released."""
        self.num_preemptions += 1
        request.num_preemptions += 1
        self._release_slot(request)
        # with drafts in flight its KV reaches past what the result will keep: recompute instead
        swap = (self.config.preemption_mode == "swap"
                and len(request.block_ids) <= self.swap_space.num_free
                and request.num_computed_tokens >= request.num_tokens and not request.num_drafts_in_flight)
        if keep_blocks:
            request.status = RequestStatus.WAITING
        elif swap:
            cpu_blocks = self.swap_space.allocate(len(request.block_ids))
            step.swap_out.extend(zip(request.block_ids, cpu_blocks))
            request.swapped_block_ids = cpu_blocks
            self.allocator.free(request.block_ids)
            request.block_ids = []
            request.status = RequestStatus.SWAPPED
        else:
            self._release_blocks(request)
            request.status = RequestStatus.WAITING
        self.waiting.requeue(request, self._clock())

    def _release_slot(self, request: Request) -> None:
        self.running.remove(request)
        self._free_slots.append(request.slot)
        request.slot = None
        self._num_slot_releases += 1

    def _release_blocks(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []
        request.block_hashes = []
        request.num_computed_tokens = 0

    def _finish(self, request: Request, reason: str) -> RequestOutput:
        if request.status is RequestStatus.RUNNING:
            self._release_slot(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.SWAPPED):
            self.waiting.remove(request)
        self.allocator.free(request.block_ids)
        request.block_ids = []
        if request.swapped_block_ids:
            self.swap_space.free(request.swapped_block_ids)
            request.swapped_block_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.matcher = request.matcher_ready = None
        del self.requests[request.request_id]
        return RequestOutput(request_id=request.request_id, token_ids=[], finish_reason=reason,
                             num_prompt_tokens=len(request.prompt_token_ids),
                             num_cached_tokens=request.num_cached_tokens)

    # ---- results ------------------------------------------------------------------------

    def process_result(self, step: ScheduledStep, result: ForwardResult) -> list[RequestOutput]:
        for (request, start), entries in zip(step.prompt_logprob_requests, result.prompt_logprobs):
            if request.prompt_logprobs is not None:
                request.prompt_logprobs[start:start + len(entries)] = entries
        outputs = []
        for row, request in enumerate(step.sampled):
            request.num_pending_samples -= 1
            num_drafts, request.num_drafts_in_flight = request.num_drafts_in_flight, 0
            if request.is_finished:
                continue  # finished or aborted while this step was in flight
            if result.accepted_token_ids:
                tokens, logprobs = result.accepted_token_ids[row], result.accepted_logprobs[row]
            else:
                tokens, logprobs = [result.token_ids[row]], [result.logprobs[row]]
            if num_drafts:
                self._roll_back_drafts(request, num_drafts - (len(tokens) - 1))
                self.speculation.record(request, num_drafts, len(tokens) - 1)
            output = self._emit(request, tokens, logprobs)
            if request.prompt_logprobs is not None and not request.prompt_logprobs_sent:
                output.prompt_logprobs = request.prompt_logprobs
                request.prompt_logprobs_sent = True
            outputs.append(output)
        return outputs

    def _emit(self, request: Request, tokens: list[int], logprobs: list[SampledLogprobs | None]) -> RequestOutput:
        """Appends the step's tokens one by one until one finishes the request: a stop or the length limit
        among accepted drafts ends it there, as decoding them one step at a time would."""
        emitted: list[int] = []
        for token in tokens:
            request.output_token_ids.append(token)
            emitted.append(token)
            self._register_full_blocks(request)
            if request.matcher is not None:
                # a grammar already in error failed when masked (one llguidance rejects only then): the
                # client's; a token refused by a sound grammar is the server's
                late_rejection = request.matcher.is_error()
                if not accepts(request.matcher, token):
                    return self._grammar_failure(request, token, late_rejection)
            reason = self.stop_checker.finish_reason(request, token)
            stop_token_id = token if reason == "stop" else None  # the checker's "stop" is a stop token's
            if reason is None and request.matcher is not None and request.matcher.is_stopped():
                reason = "stop"  # the grammar is complete: nothing but EOS could follow, even with ignore_eos
            if reason is not None:
                output = self._finish(request, reason)
                output.stop_token_id = stop_token_id
                break
        else:
            output = RequestOutput(request_id=request.request_id, token_ids=[],
                                   num_prompt_tokens=len(request.prompt_token_ids),
                                   num_cached_tokens=request.num_cached_tokens)
        output.token_ids = emitted
        output.logprobs = logprobs[:len(emitted)] if request.params.logprobs is not None else None
        return output

    def _grammar_failure(self, request: Request, token: int, late_rejection: bool) -> RequestOutput:
        reason = request.matcher.get_error().strip().splitlines()[0]  # the rest is llguidance's state dump
        failed = self._finish(request, "error")
        if late_rejection:
            failed.error, failed.error_code = f"the structured output's grammar failed once applied: {reason}", 400
            failed.error_param = CONSTRAINT_PARAM
        elif exceeded_limits(reason):
            failed.error, failed.error_code = f"the structured output's grammar exceeds the limits of the grammar " \
                                              f"engine: {reason}", 400
            failed.error_param = CONSTRAINT_PARAM
        else:
            failed.error, failed.error_code = f"the grammar refused token {token}: {reason}", 500
        return failed

    def _roll_back_drafts(self, request: Request, rejected: int) -> None:
        """Forgets the KV of rejected drafts: the request continues after its accepted tokens, and blocks
        past them go back to the pool (none of them is in the prefix cache: only blocks of known tokens
        are registered). A request preempted meanwhile has released its KV already."""
        if rejected == 0 or not request.block_ids:
            return
        request.num_computed_tokens -= rejected
        keep = -(-request.num_computed_tokens // self.block_size)
        self.allocator.free(request.block_ids[keep:])
        del request.block_ids[keep:]
        request.num_blocks_sent = min(request.num_blocks_sent, keep)

    def grammar_mask(self, step: ScheduledStep) -> memoryview:
        """The packed bitmask of the step's grammar rows, from its requests' grammars as they stand: call it
        once the tokens before the step are all in, and send it before the next (see GrammarMatchers.masks)."""
        return self.grammars.masks([None if r.is_finished else r.matcher for r in step.grammar_requests])

    def stats(self) -> dict:
        running = {name: 0 for name in PRIORITY_RANK}
        for request in self.running:
            running[request.priority] += 1
        return {"running": running, "waiting": self.waiting.counts(), "num_kv_blocks": self.allocator.num_blocks,
                "num_free_kv_blocks": self.allocator.num_free, "num_cached_kv_blocks": self.allocator.num_cached,
                "prefix_cache_queries": self.prefix_stats.queries, "prefix_cache_hits": self.prefix_stats.hits,
                "num_prompt_tokens": self.prefix_stats.prompt_tokens,
                "num_cached_prompt_tokens": self.prefix_stats.cached_prompt_tokens,
                "num_preemptions": self.num_preemptions,
                "num_spec_proposed_tokens": self.speculation.num_proposed,
                "num_spec_accepted_tokens": self.speculation.num_accepted}

    def log_stats(self) -> None:
        """One line of load and prefix-cache use; `schedule` calls it every STATS_LOG_INTERVAL_S while busy."""
        p = self.prefix_stats
        used = self.allocator.num_blocks - self.allocator.num_free
        logger.info("%d running, %d waiting, %d/%d KV blocks in use, %d preemptions; prefix cache: %d/%d looked-up "
                    "tokens hit (%.1f%%), %d/%d prompt tokens cached (%.1f%%)", len(self.running), len(self.waiting),
                    used, self.allocator.num_blocks, self.num_preemptions, p.hits, p.queries,
                    _percent(p.hits, p.queries), p.cached_prompt_tokens, p.prompt_tokens,
                    _percent(p.cached_prompt_tokens, p.prompt_tokens))
        if self.speculation.enabled:
            logger.info("speculation: %s", self.speculation_summary())

    def speculation_summary(self) -> str:
        s = self.speculation
        return f"{s.num_accepted}/{s.num_proposed} draft tokens accepted ({100 * s.acceptance_rate:.1f}%)"


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _error(request_id: str, message: str, code: int, param: str | None = None) -> RequestOutput:
    return RequestOutput(request_id=request_id, token_ids=[], finish_reason="error", error=message, error_code=code,
                         error_param=param)
