"""A launched step's result on its way to the host.

It owns the host copies of its outputs and the event that marks their copy done, so a queue of them
resolves in launch order without the runner: the worker can launch step N+1 before step N's tokens
are read, and a thread can sleep on the event until they are.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from sfllm.messages import ForwardResult, SampledLogprobs, TokenLogprob
from sfllm.worker.sampler import SamplerOutput


class PendingStep:
    def __init__(self, step_id: int, started: float, sampled_slots: list[int], drafts: list[list[int]] | None,
                 tokens: torch.Tensor | None = None, sampler_output: SamplerOutput | None = None,
                 sampler_rows: list[int] | None = None, logprob_counts: list[int | None] | None = None,
                 prompt_logprobs: list[list[SampledLogprobs]] | None = None) -> None:
        """`tokens` [N]: the tokens of the N sampled rows (of `sampled_slots`, a sequence's slot once per row).
        `drafts`: None, or per sampled sequence its drafts, which its 1 + k rows verify. `sampler_output`, when
        the eager sampler drew rows `sampler_rows` of them, with `logprob_counts` each (None: no logprobs).
        `prompt_logprobs`: already on the host, one list per entry of the batch's `prompt_logprobs`."""
        self.step_id = step_id
        self.drafts = drafts
        self.sequence_slots = sampled_slots
        if drafts is not None:
            firsts = np.cumsum([0] + [1 + len(d) for d in drafts[:-1]]).tolist()
            self.sequence_slots = [sampled_slots[row] for row in firsts]
        self.started = started
        self.slot_states: list = []  # per sequence, the worker's state of its slot at launch (ModelRunner's)
        self.launch_time_s = 0.0  # ForwardResult.launch_time_s
        self._rows = sampler_rows or []
        self._logprob_counts = logprob_counts or []
        self._prompt_logprobs = prompt_logprobs or []
        self._result: ForwardResult | None = None
        self.copied: torch.cuda.Event | None = None
        self._tokens = self._logprobs = None
        if tokens is None:
            return
        cuda = tokens.device.type == "cuda"
        self._tokens = tokens.to("cpu", non_blocking=cuda)
        if sampler_output is not None and sampler_output.logprobs is not None:
            self._logprobs = [t.to("cpu", non_blocking=cuda) for t in (sampler_output.logprobs,
                                                                       sampler_output.top_token_ids,
                                                                       sampler_output.top_logprobs,
                                                                       sampler_output.ranks)]
        if cuda:
            # a blocking-sync event: a thread waiting on it sleeps instead of spinning
            self.copied = torch.cuda.Event(blocking=True)
            self.copied.record()

    def ready(self) -> bool:
        """True once the outputs are on the host (reading the result will not block)."""
        return self._result is not None or self.copied is None or self.copied.query()

    def result(self, gpu_memory: tuple[int, int]) -> ForwardResult:
        """The step's ForwardResult (waits for the copy); packed once, with `gpu_memory` (allocated, reserved)."""
        if self._result is None:
            if self.copied is not None:
                self.copied.synchronize()
            self._result = self._pack(gpu_memory)
        return self._result

    def _pack(self, gpu_memory: tuple[int, int]) -> ForwardResult:
        token_ids = [] if self._tokens is None else self._tokens.tolist()
        logprobs: list[SampledLogprobs | None] = [None] * len(token_ids)
        if self._logprobs is not None:
            chosen, top_ids, top_logprobs, ranks = self._logprobs
            for index, (row, count) in enumerate(zip(self._rows, self._logprob_counts)):
                if count is not None:
                    top = [TokenLogprob(int(i), float(lp)) for i, lp in zip(top_ids[index, :count].tolist(),
                                                                            top_logprobs[index, :count].tolist())]
                    logprobs[row] = SampledLogprobs(float(chosen[index]), top, int(ranks[index]))
        accepted: list[list[int]] = []
        accepted_logprobs: list[list[SampledLogprobs | None]] = []
        if self.drafts is not None:
            token_ids, logprobs, accepted, accepted_logprobs = verify_drafts(token_ids, logprobs, self.drafts)
        return ForwardResult(step_id=self.step_id, token_ids=token_ids, logprobs=logprobs,
                             accepted_token_ids=accepted, accepted_logprobs=accepted_logprobs,
                             prompt_logprobs=self._prompt_logprobs,
                             forward_time_s=time.perf_counter() - self.started, launch_time_s=self.launch_time_s,
                             gpu_memory_allocated=gpu_memory[0], gpu_memory_reserved=gpu_memory[1])


def verify_drafts(row_tokens: list[int], row_logprobs: list[SampledLogprobs | None], drafts: list[list[int]]
                  ) -> tuple[list[int], list[SampledLogprobs | None], list[list[int]], list[list[SampledLogprobs | None]]]:
    """Per sequence: its tokens up to the first that differs from its draft at that position, and that one.

    Each row drew its token as plain decoding would, given the drafts before it; so while the drafts equal
    the draws, they are the very tokens plain decoding emits, and at the first that differs the draw is
    plain decoding's next token. Greedy: the longest prefix where draft == argmax, then the target's token.
    Sampled: a draft d survives with probability p(d), and a draw that differs from d is distributed as p
    without d, renormalised: rejection sampling of a point-mass draft, whose result is distributed exactly
    as p (with a seed, it is the very token the seed gives without drafts). A row's logprobs are the target's
    at its position, given the drafts before it: those of plain decoding for every emitted token. Returns
    (each sequence's last token, its first row's logprobs, its emitted tokens, their logprobs)."""
    last, logprobs, emitted, emitted_logprobs = [], [], [], []
    row = 0
    for draft in drafts:
        tokens = row_tokens[row:row + len(draft) + 1]
        accepted = 0
        while accepted < len(draft) and tokens[accepted] == draft[accepted]:
            accepted += 1
        emitted.append(tokens[:accepted + 1])
        emitted_logprobs.append(row_logprobs[row:row + accepted + 1])
        last.append(tokens[accepted])
        logprobs.append(row_logprobs[row])
        row += len(draft) + 1
    return last, logprobs, emitted, emitted_logprobs
