"""What `LLM.generate` returns, in vLLM's shapes: code written against vLLM's RequestOutput reads these.

Logprobs come as vLLM lays them out: per token, a dict by token id of `Logprob`s holding the token's own entry
(sampled, or the prompt's) and the top alternatives asked for; the prompt's first token has none (None).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sfllm.frontend.logprobs_format import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    # with SamplingParams.logprobs: one dict per token of token_ids
    logprobs: list[TokenLogprobs] | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or `stop_token_ids` token that ended it

    def finished(self) -> bool:
        """vLLM's: whether this output ended (always, in what generate returns)."""
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        """vLLM's: the sum of the sampled tokens' logprobs, where logprobs were asked for."""
        if self.logprobs is None:
            return None
        return sum(entries[token_id].logprob for token_id, entries in zip(self.token_ids, self.logprobs))


@dataclass
class GenerationResult:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0
    # with SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing comes before it)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    request_id: str = ""
    finished: bool = True  # vLLM's: every output ended, as in every result generate returns
