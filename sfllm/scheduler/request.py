"""A request as the scheduler tracks it, from arrival to finish."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from sfllm.messages import SampledLogprobs
from sfllm.sampling_params import SamplingParams
from sfllm.scheduler.priority import PRIORITY_RANK


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    client_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: str
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    # the parent hash of its first block in the prefix cache: its cache salt's (BlockAllocator.salted_root)
    prefix_root: int | None = None
    swapped_block_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    # leading entries of block_ids that the worker's table for `slot` already holds
    num_blocks_sent: int = 0
    # tokens whose KV is computed or in a step already sent to the worker
    num_computed_tokens: int = 0
    # tokens sampled in sent steps whose results have not come back yet
    num_pending_samples: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    enqueue_time: float = 0.0
    # since when it waits for aging: its enqueue time, or its last preemption
    waiting_since: float = 0.0
    first_scheduled_time: float | None = None
    finish_reason: str | None = None
    needs_sampling_state: bool = True
    # a background request admitted after waiting past its bound ranks as high from then on:
    # short of blocks, the normal work it pushed out gives way before it does
    aged: bool = False
    # the grammar's state after the output tokens known so far (an llguidance.LLMatcher), if constrained
    matcher: Any = None
    # while the matcher is being built (GrammarMatchers.compile), its future: the request waits until it is done
    matcher_ready: Any = None
    # of prompt tokens 1.., filled as prefill chunks come back, if asked for; sent with the first output
    prompt_logprobs: list[SampledLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    # speculative decoding: drafts in the request's step in flight (it sits out until that step is back,
    # whose accepted tokens decide where it continues); steps it asked for drafts in, the draft slots those
    # offered, drafts accepted; decode steps left before it looks for drafts again after finding none
    num_drafts_in_flight: int = 0
    num_spec_steps: int = 0
    num_spec_slots: int = 0
    num_spec_accepted: int = 0
    spec_backoff: int = 0
    speculation_off: bool = False

    @property
    def rank(self) -> int:
        return PRIORITY_RANK["high"] if self.aged else PRIORITY_RANK[self.priority]

    @property
    def num_tokens(self) -> int:
        """Tokens whose ids the scheduler knows."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_id(self, index: int) -> int:
        prompt_len = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < prompt_len else self.output_token_ids[index - prompt_len]

    def token_slice(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]

    @property
    def is_prefilling(self) -> bool:
        """More to compute than a decode's one token: a prompt, or prompt and outputs again after a recompute."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def is_paused(self) -> bool:
        """Waiting with its KV blocks: preempted for its slot alone, it resumes where it stopped."""
        return self.status is RequestStatus.WAITING and bool(self.block_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_outputs_committed(self) -> int:
        """Outputs known plus those in flight: what max_tokens is checked against when scheduling."""
        return len(self.output_token_ids) + self.num_pending_samples
