"""Engine logprobs in the two shapes OpenAI uses (completions' lists and chat's per-token objects), in vLLM's
(a dict by token id a position: the offline API's outputs and the `prompt_logprobs` extension) and in SGLang's
(`[logprob, token_id, text]` triples: /generate's meta_info)."""
from __future__ import annotations

import codecs
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sfllm.frontend.openai_responses import (ChatLogprobs, ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs,
                                             PromptLogprobs, PromptTokenLogprob)
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.messages import SampledLogprobs

# JSON has no -inf; OpenAI reports impossible tokens with this value.
_LOWEST_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _LOWEST_LOGPROB


TokenLogprobs = dict[int, "Logprob"]


@dataclass
class Logprob:
    """vLLM's: a token's log probability, its rank in the vocabulary (1: the likeliest) and its text alone."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def by_token(token_id: int, entry: SampledLogprobs, token_text: Callable[[int], str] | None) -> TokenLogprobs:
    """One position's logprobs, vLLM's way: the token's own first, then each alternative not already there, ranked
    by its place in the top list. `token_text`: a token's text (None: `decoded_token` left None, as vLLM leaves it
    with detokenize=False)."""
    def text(t: int) -> str | None:
        return None if token_text is None else token_text(t)

    entries = {token_id: Logprob(entry.logprob, entry.rank, text(token_id))}
    for rank, alternative in enumerate(entry.top, 1):
        if alternative.token_id not in entries:
            entries[alternative.token_id] = Logprob(alternative.logprob, rank, text(alternative.token_id))
    return entries


class TextOffsets:
    """Where each of a text's tokens starts in it, in characters. A token's shown text is no measure: a
    byte-level vocabulary splits a character into tokens shown as stray bytes ("\\xe4\\xbd"); a token
    adds the characters its bytes complete."""

    def __init__(self, tokenizer: Tokenizer, start: int) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = start

    def add(self, token_id: int) -> int:
        """The offset of `token_id`, the text's next token."""
        offset = self.offset
        self.offset += len(self._decoder.decode(self._tokenizer.token_bytes(token_id)))
        return offset


def token_name(tokenizer: Tokenizer, token_id: int, as_id: bool = False) -> str:
    """How a logprob names its token: the vocabulary's text, or with vLLM's `return_tokens_as_token_ids`
    "token_id:<id>" (tokens of one text, or text no character completes, stay apart)."""
    return f"token_id:{token_id}" if as_id else tokenizer.token_text(token_id)


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[SampledLogprobs],
                        offsets: TextOffsets, as_ids: bool = False) -> CompletionLogprobs:
    """Tokens, their logprobs, the top alternatives plus the sampled token, and where each starts."""
    result = CompletionLogprobs()
    for token_id, sampled in zip(token_ids, logprobs):
        text = token_name(tokenizer, token_id, as_ids)
        top = {token_name(tokenizer, alternative.token_id, as_ids): finite(alternative.logprob)
               for alternative in sampled.top}
        top.setdefault(text, finite(sampled.logprob))
        result.tokens.append(text)
        result.token_logprobs.append(finite(sampled.logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(offsets.add(token_id))
    return result


def extend_completion_logprobs(total: CompletionLogprobs, more: CompletionLogprobs) -> None:
    total.tokens.extend(more.tokens)
    total.token_logprobs.extend(more.token_logprobs)
    total.top_logprobs.extend(more.top_logprobs)
    total.text_offset.extend(more.text_offset)


def _chat_top_logprob(tokenizer: Tokenizer, token_id: int, logprob: float, as_id: bool) -> ChatTopLogprob:
    name = token_name(tokenizer, token_id, as_id)
    return ChatTopLogprob(token=name, logprob=finite(logprob),
                          bytes=list(name.encode() if as_id else tokenizer.token_bytes(token_id)))


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], logprobs: list[SampledLogprobs],
                  num_top: int, as_ids: bool = False) -> ChatLogprobs:
    content = []
    for token_id, sampled in zip(token_ids, logprobs):
        entry = _chat_top_logprob(tokenizer, token_id, sampled.logprob, as_ids)
        top = [_chat_top_logprob(tokenizer, alternative.token_id, alternative.logprob, as_ids)
               for alternative in sampled.top[:num_top]]
        content.append(ChatTokenLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes, top_logprobs=top))
    return ChatLogprobs(content=content)


def prompt_completion_logprobs(tokenizer: Tokenizer, prompt_token_ids: list[int],
                               logprobs: list[SampledLogprobs], as_ids: bool = False) -> CompletionLogprobs:
    """An echoed prompt's part of completions' logprobs: the first token has none (null), as in OpenAI's."""
    first = token_name(tokenizer, prompt_token_ids[0], as_ids)
    offsets = TextOffsets(tokenizer, 0)
    offsets.add(prompt_token_ids[0])
    result = completion_logprobs(tokenizer, prompt_token_ids[1:], logprobs, offsets, as_ids)
    return CompletionLogprobs(tokens=[first] + result.tokens, token_logprobs=[None] + result.token_logprobs,
                              top_logprobs=[None] + result.top_logprobs, text_offset=[0] + result.text_offset)


def prompt_logprobs_by_token(tokenizer: Tokenizer, prompt_token_ids: list[int],
                             logprobs: list[SampledLogprobs]) -> PromptLogprobs:
    """The `prompt_logprobs` extension in vLLM's layout: per prompt token after the first, by token id, the
    token's own logprob and rank and the top alternatives' (ranked by their order)."""
    entries: PromptLogprobs = [None]
    for token_id, sampled in zip(prompt_token_ids[1:], logprobs):
        entries.append({str(t): PromptTokenLogprob(logprob=finite(e.logprob), rank=e.rank,
                                                   decoded_token=e.decoded_token)
                        for t, e in by_token(token_id, sampled, tokenizer.token_decoded).items()})
    return entries


# SGLang's form of one token's logprob: [logprob (None where none is computed), token id, text (None unless asked)]
SGLangLogprob = list[Any]


def sglang_logprobs(token_ids: list[int], logprobs: list[SampledLogprobs], num_top: int,
                    token_text: Callable[[int], str] | None) -> tuple[list[SGLangLogprob], list[list[SGLangLogprob]]]:
    """SGLang's `*_token_logprobs` and `*_top_logprobs` of `token_ids`: each token's triple, and its `num_top`
    likeliest alternatives' (no lists when `num_top` is 0). `token_text`: a token's text (None: text left null)."""
    def triple(token_id: int, logprob: float) -> SGLangLogprob:
        return [finite(logprob), token_id, None if token_text is None else token_text(token_id)]

    entries = [triple(token_id, sampled.logprob) for token_id, sampled in zip(token_ids, logprobs)]
    tops = [[triple(alternative.token_id, alternative.logprob) for alternative in sampled.top[:num_top]]
            for sampled in logprobs] if num_top else []
    return entries, tops


def sglang_prompt_logprobs(prompt_token_ids: list[int], logprobs: list[SampledLogprobs], start: int, num_top: int,
                           token_text: Callable[[int], str] | None) -> tuple[list[SGLangLogprob],
                                                                             list[list[SGLangLogprob] | None]]:
    """SGLang's `input_token_logprobs` and `input_top_logprobs`: the prompt's tokens from `start` on, `logprobs`
    being the engine's of prompt tokens 1 on. The first entry's logprob and top list are null even where `start` > 0:
    SGLang scores the positions from `start` on, and a position's logits give the next token's logprob."""
    first = prompt_token_ids[start]
    entries, tops = sglang_logprobs(prompt_token_ids[start + 1:], logprobs[start:], num_top, token_text)
    return ([[None, first, None if token_text is None else token_text(first)]] + entries,
            [None] + tops if num_top else [])
