"""Logprobs of prompt tokens, each given the tokens before it: for the requests that ask, from the
hidden states of their prefill chunk (an extra pass of the LM head over those positions alone)."""
from __future__ import annotations

import itertools

import torch

from sfllm.messages import ForwardBatch, SampledLogprobs, TokenLogprob
from sfllm.worker.model import CausalLM

# positions per LM-head pass: bounds the float32 logits to SLICE x vocabulary at a time
SLICE = 512


def prompt_token_logprobs(model: CausalLM, batch: ForwardBatch, hidden: torch.Tensor) -> list[list[SampledLogprobs]]:
    """Per entry of `batch.prompt_logprobs`, the logprob of each target token and the top alternatives,
    from `hidden` [T, hidden], the states of all the batch's new tokens."""
    starts = [0, *itertools.accumulate(batch.num_new_tokens)]
    results = []
    for targets in batch.prompt_logprobs:
        first = starts[targets.row]
        entries: list[SampledLogprobs] = []
        for offset in range(0, len(targets.token_ids), SLICE):
            ids = targets.token_ids[offset:offset + SLICE]
            logprobs = torch.log_softmax(model.compute_logits(hidden[first + offset:first + offset + len(ids)]), -1)
            chosen = logprobs.gather(1, torch.tensor(ids, device=logprobs.device)[:, None])
            ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
            top_logprobs, top_ids = logprobs.topk(max(targets.num_top, 1), dim=-1)
            top_logprobs = top_logprobs[:, :targets.num_top].tolist()
            top_ids = top_ids[:, :targets.num_top].tolist()
            entries.extend(SampledLogprobs(lp, [TokenLogprob(i, t) for i, t in zip(row_ids, row_lps)], rank)
                           for lp, rank, row_ids, row_lps in zip(chosen.squeeze(1).tolist(), ranks, top_ids,
                                                                 top_logprobs))
        results.append(entries)
    return results
