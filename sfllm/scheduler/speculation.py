"""When a request speculates, how many drafts it may have, and what its drafts earned.

Speculative decoding turns a decode into a row of 1 + k tokens (the token to decode, then k drafts); the
worker samples every position as a plain decode would and keeps the drafts up to the first one that
differs from its own token. It pays where a step is bound by reading the weights (small batches) and drafts
are accepted; elsewhere it costs. So:
- a step of more than `speculative_max_batch_size` running requests has no drafts;
- a request stops speculating once, after WARMUP_STEPS steps, its drafts were accepted for fewer than
  `speculative_min_acceptance_rate` of the draft slots it was offered (matched or not: k per step, or fewer
  where max_tokens, the context, the step's budget or the free blocks left less room);
- a request whose sampling depends on its own previous tokens (penalties, a grammar) never speculates:
  those would need the drafts' effect replayed inside one row (logprobs are per row: they speculate);
- a request whose last tokens match nothing earlier decodes NO_MATCH_BACKOFF_STEPS steps plainly (with the
  overlap) before it looks again.

Drafts never reach past `max_tokens` or the context; a stop token among the accepted ones ends the request
there (Scheduler.process_result), so outputs are exactly those of plain decoding.
"""
from __future__ import annotations

from sfllm.config import SchedulerConfig
from sfllm.scheduler.draft_proposer import DraftProposer, NgramProposer
from sfllm.scheduler.request import Request

# Steps a request speculates before its acceptance rate may turn it off: the peers' order of magnitude (vLLM,
# SGLang); the rate itself is a measured break-even (config.py), the batch limit in docs/performance.md.
WARMUP_STEPS = 16
# Steps a request decodes plainly after its context had no match for its last tokens: meanwhile it does not
# hold the overlap of steps back (one step without overlap per probe instead of every step).
NO_MATCH_BACKOFF_STEPS = 8


class Speculation:
    def __init__(self, config: SchedulerConfig, max_context_length: int, proposer: DraftProposer | None = None) -> None:
        self.enabled = config.speculative_method is not None
        self.num_tokens = config.num_speculative_tokens
        self.max_batch_size = config.speculative_max_batch_size
        self.min_acceptance_rate = config.speculative_min_acceptance_rate
        self.max_context_length = max_context_length
        self.proposer = proposer or NgramProposer(config.speculative_ngram_min, config.speculative_ngram_max)
        self.num_proposed = 0  # draft tokens sent to be verified
        self.num_accepted = 0  # of those, accepted

    def active(self, num_running: int) -> bool:
        """Whether a step of `num_running` requests may carry drafts."""
        return self.enabled and num_running <= self.max_batch_size

    def eligible(self, request: Request) -> bool:
        """Whether the request may draft in its next decode."""
        params = request.params
        # short of min_tokens, a step's rows must know their output index, which drafts in flight blur; a bad
        # word's ban reads the tokens before the drawn one, which a draft's rows do not have
        return (not request.speculation_off and request.spec_backoff == 0 and request.matcher is None
                and not params.has_penalties and not params.bad_words_token_ids
                and len(request.output_token_ids) >= params.min_tokens)

    def count_step(self, request: Request) -> None:
        """A decode step of the request went out: its backoff, if any, is one step shorter."""
        if request.spec_backoff:
            request.spec_backoff -= 1

    def drafts(self, request: Request, budget: int, room: int) -> list[int]:
        """Drafts to follow the request's next decode (of its last known token); [] when it has none.

        `room`: KV slots the row may fill (its blocks' and the free ones'): drafts that do not fit are not
        offered, nor counted against the request. Its emitted tokens (accepted drafts and one more) stay
        within max_tokens and the context."""
        max_drafts = min(self.num_tokens, budget - 1, room - 1,
                         request.params.max_tokens - len(request.output_token_ids) - 1,
                         self.max_context_length - request.num_tokens - 1)
        if max_drafts <= 0:
            return []
        request.num_spec_steps += 1
        request.num_spec_slots += max_drafts
        drafts = self.proposer.propose(request.prompt_token_ids + request.output_token_ids, max_drafts)
        if not drafts:
            request.spec_backoff = NO_MATCH_BACKOFF_STEPS
            self.judge(request)
        return drafts

    def record(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """Counts a verified step's drafts; turns the request's speculation off when it does not pay."""
        self.num_proposed += num_drafts
        self.num_accepted += num_accepted
        request.num_spec_accepted += num_accepted
        self.judge(request)

    def judge(self, request: Request) -> None:
        """Turns the request's speculation off for good once its warm-up shows its drafts do not pay."""
        if (request.num_spec_steps >= WARMUP_STEPS
                and request.num_spec_accepted < self.min_acceptance_rate * request.num_spec_slots):
            request.speculation_off = True

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0
