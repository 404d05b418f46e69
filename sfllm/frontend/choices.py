"""From token ids to choices and back to text: the one path of the server and of the offline LLM.

Prompts are tokenized by the Tokenizer (`encode`, `apply_chat_template`); `plan_choices` fans
each out to its `n` choices, one GenerateRequest each; a ChoiceDecoder turns one choice's
engine outputs into text deltas, cutting at a stop string. The server streams the engine's
outputs through it (choice_generation.py), the offline LLM steps its engine (llm.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec

from sfllm.frontend.detokenizer import IncrementalDetokenizer
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.messages import GenerateRequest, RequestOutput, SampledLogprobs
from sfllm.sampling_params import SamplingParams

# Seeds (any int64, as vLLM takes them) are wrapped into [0, 2^63), the seeds the worker draws with (its int64 tensors
# mark an unseeded row -1): a negative seed s samples as s + 2^63 does, so distinct negative seeds stay distinct.
SEED_BOUND = 2**63


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_index: int
    request: GenerateRequest
    # the request field the output's constraint came from (guided_json, tools, ...), which an engine error about
    # the constraint names
    constraint_field: str | None = None


@dataclass
class ChoiceDelta:
    """What one engine output added to a choice; `num_output_tokens` counts the choice so far."""
    index: int
    prompt_index: int
    text: str
    token_ids: list[int]
    logprobs: list[SampledLogprobs] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    prompt_token_ids: list[int]
    # in a choice's first delta, if asked for: the logprobs of prompt tokens 1..
    prompt_logprobs: list[SampledLogprobs] | None = None
    # what ended the choice, SGLang's `matched`: a stop string, or a stop token's id (EOS or of `stop_token_ids`)
    matched_stop: int | str | None = None
    # vLLM's `stop_reason`: the stop string, or the token of the request's `stop_token_ids`, that ended it (not EOS)
    stop_reason: int | str | None = None


def plan_choices(request_id: str, prompts: list[list[int]], params: list[SamplingParams],
                 priority: str | list[str], arrival_time: float | None = None,
                 constraint_field: str | None = None, cache_salt: str | None | list[str | None] = None) -> list[Choice]:
    """n choices per prompt, indexed prompt_index * n + i; a seed gives choice i the seed + i. `priority` and
    `cache_salt`: those of every prompt, or of each."""
    priorities = [priority] * len(prompts) if isinstance(priority, str) else priority
    salts = cache_salt if isinstance(cache_salt, list) else [cache_salt] * len(prompts)
    choices = []
    now = time.time() if arrival_time is None else arrival_time
    for prompt_index, (prompt, prompt_params, prompt_priority, salt) in enumerate(zip(prompts, params, priorities,
                                                                                     salts)):
        for sample in range(prompt_params.n):
            index = prompt_index * prompt_params.n + sample
            seed = None if prompt_params.seed is None else (prompt_params.seed + sample) % SEED_BOUND
            sample_params = msgspec.structs.replace(prompt_params, n=1, seed=seed)
            request = GenerateRequest(request_id=f"{request_id}-{index}", prompt_token_ids=prompt,
                                      params=sample_params, priority=prompt_priority, arrival_time=now,
                                      cache_salt=salt)
            choices.append(Choice(index=index, prompt_index=prompt_index, request=request,
                                  constraint_field=constraint_field))
    return choices


class ChoiceDecoder:
    """One choice's engine outputs as text deltas: detokenized, cut at the first stop string.

    A stop string finishes the choice ("stop") before the engine knows: when a delta has a
    finish reason but the engine's output had none, the caller aborts the engine's request.
    Without `detokenize` in its params the choice is token ids only, and stop strings are not
    looked for."""

    def __init__(self, tokenizer: Tokenizer, choice: Choice) -> None:
        self.choice = choice
        request = choice.request
        self._detokenizer = (IncrementalDetokenizer(tokenizer, request.prompt_token_ids, request.params)
                             if request.params.detokenize else None)
        self.num_output_tokens = 0
        self.finish_reason: str | None = None

    def decode(self, output: RequestOutput) -> ChoiceDelta:
        """The delta of `output`; tokens after a stop string are not part of it."""
        detokenizer = self._detokenizer
        params = self.choice.request.params
        finish_reason = output.finish_reason
        matched: int | str | None = output.stop_token_id
        if detokenizer is None:
            text, num_consumed = "", len(output.token_ids)
        else:
            # as vLLM and SGLang: the stop token's id is output, its text is not (unless asked for)
            hidden = output.stop_token_id is not None and not params.include_stop_str_in_output
            consumed_before = detokenizer.num_tokens
            text = detokenizer.append(output.token_ids[:-1] if hidden else output.token_ids)
            num_consumed = detokenizer.num_tokens - consumed_before
            if detokenizer.matched_stop is not None:
                finish_reason, matched = "stop", detokenizer.matched_stop
            elif finish_reason is not None:
                text += detokenizer.flush()
                num_consumed += hidden
        self.num_output_tokens += num_consumed
        self.finish_reason = finish_reason
        return ChoiceDelta(
            index=self.choice.index,
            prompt_index=self.choice.prompt_index,
            text=text,
            token_ids=output.token_ids[:num_consumed],
            logprobs=output.logprobs[:num_consumed] if output.logprobs is not None else None,
            finish_reason=finish_reason,
            num_prompt_tokens=output.num_prompt_tokens or len(self.choice.request.prompt_token_ids),
            num_cached_tokens=output.num_cached_tokens,
            num_output_tokens=self.num_output_tokens,
            prompt_token_ids=self.choice.request.prompt_token_ids,
            prompt_logprobs=output.prompt_logprobs,
            matched_stop=matched,
            stop_reason=matched if isinstance(matched, str) or matched in params.stop_token_ids else None,
        )
