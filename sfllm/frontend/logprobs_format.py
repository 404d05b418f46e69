"""Engine logprobs in the two shapes OpenAI uses: completions' lists and chat's per-token objects."""
from __future__ import annotations

import math

from sfllm.frontend.openai_protocol import ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.messages import SampledLogprobs

# JSON has no -inf; OpenAI reports impossible tokens with this value.
_LOWEST_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _LOWEST_LOGPROB


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[SampledLogprobs],
                        first_text_offset: int) -> CompletionLogprobs:
    """Tokens, their logprobs, the top alternatives plus the sampled token, and where each starts."""
    result = CompletionLogprobs()
    offset = first_text_offset
    for token_id, sampled in zip(token_ids, logprobs):
        text = tokenizer.token_text(token_id)
        top = {tokenizer.token_text(alternative.token_id): _finite(alternative.logprob) for alternative in sampled.top}
        top.setdefault(text, _finite(sampled.logprob))
        result.tokens.append(text)
        result.token_logprobs.append(_finite(sampled.logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(text)
    return result


def extend_completion_logprobs(total: CompletionLogprobs, more: CompletionLogprobs) -> None:
    total.tokens.extend(more.tokens)
    total.token_logprobs.extend(more.token_logprobs)
    total.top_logprobs.extend(more.top_logprobs)
    total.text_offset.extend(more.text_offset)


def _chat_top_logprob(tokenizer: Tokenizer, token_id: int, logprob: float) -> ChatTopLogprob:
    return ChatTopLogprob(token=tokenizer.token_text(token_id), logprob=_finite(logprob),
                          bytes=list(tokenizer.token_bytes(token_id)))


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[SampledLogprobs],
                  num_top: int) -> ChatLogprobs:
    content = []
    for token_id, sampled in zip(token_ids, logprobs):
        entry = _chat_top_logprob(tokenizer, token_id, sampled.logprob)
        top = [_chat_top_logprob(tokenizer, alternative.token_id, alternative.logprob)
               for alternative in sampled.top[:num_top]]
        content.append(ChatTokenLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes, top_logprobs=top))
    return ChatLogprobs(content=content)


def prompt_completion_logprobs(tokenizer: Tokenizer, prompt_token_ids: list[int],
                               logprobs: list[SampledLogprobs]) -> CompletionLogprobs:
    """An echoed prompt's part of completions' logprobs: the first token has none (null), as in OpenAI's."""
    first = tokenizer.token_text(prompt_token_ids[0])
    result = completion_logprobs(tokenizer, prompt_token_ids[1:], logprobs, len(first))
    return CompletionLogprobs(tokens=[first] + result.tokens, token_logprobs=[None] + result.token_logprobs,
                              top_logprobs=[None] + result.top_logprobs, text_offset=[0] + result.text_offset)


def prompt_logprobs_by_token(tokenizer: Tokenizer, prompt_token_ids: list[int],
                             logprobs: list[SampledLogprobs]) -> list[dict[str, float] | None]:
    """The `prompt_logprobs` extension: per prompt token, its logprob and the top alternatives' by token text."""
    return [None] + completion_logprobs(tokenizer, prompt_token_ids[1:], logprobs, 0).top_logprobs
