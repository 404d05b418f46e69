"""A thinking model's reasoning out of its text, as it streams (`--reasoning-parser`): the part between
`<think>` and `</think>` becomes the message's `reasoning_content`, the rest its `content`, as vLLM and SGLang
return them with the same flag.

    qwen3        Qwen3: the answer thinks only if it opens with `<think>` (with `enable_thinking=False` the
                 template writes an empty think block into the prompt, and the answer is all content). A
                 template that opens the block in the prompt (Qwen3 "thinking" releases) starts in reasoning.
    deepseek_r1  DeepSeek R1 and its distills, QwQ: the answer starts in reasoning, `<think>` or not (their
                 templates open the block in the prompt); it ends at `</think>`, or never.

A tag split over several deltas is held back until it is whole, so the deltas of a stream join into the strings
of the whole answer. A thought cut short (by `max_tokens`) stays reasoning.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sfllm.frontend.stream_tags import partial_tag_length
from sfllm.sampling_params import ThoughtTokens

START_TAG = "<think>"
END_TAG = "</think>"
REASONING_PARSERS = ("qwen3", "deepseek_r1")


@dataclass
class SplitText:
    reasoning: str = ""
    content: str = ""


def prompt_opens_thought(prompt_tail: str) -> bool:
    """Whether a rendered prompt ends with an open think block: its template opened one for the answer (a tag in
    the user's own text, followed by the template's tokens, does not count)."""
    return prompt_tail.rstrip().endswith(START_TAG)


def answer_opening(name: str, prompt_tail: str, continued: str | None = None) -> str:
    """Where the answer starts: "reasoning" (inside a thought), "start" (it may open one) or "content". `continued`:
    the final assistant message's text that the answer continues (`continue_final_message`), whose tags say where
    it stopped."""
    if continued is not None and continued.strip():
        # without tags the message is a prefilled answer (`{"city": `), even for R1, whose thought needs no <think>
        return "reasoning" if continued.rfind(START_TAG) > continued.rfind(END_TAG) else "content"
    return "reasoning" if name == "deepseek_r1" or prompt_opens_thought(prompt_tail) else "start"


def thought_before_grammar(name: str, prompt_tail: str, encode: Callable[[str], list[int]],
                           continued: str | None = None) -> ThoughtTokens | None:
    """How a constrained answer may think first (the grammar then applies after the thought, as in vLLM): None
    where the tags are not single tokens of the vocabulary (the grammar writes the answer from its first token),
    where the prompt closed the thought already (Qwen3's `enable_thinking=False` writes an empty block) or where
    the answer continues a message past its thought."""
    start, end = encode(START_TAG), encode(END_TAG)
    opening = answer_opening(name, prompt_tail, continued)
    if len(start) != 1 or len(end) != 1 or opening == "content" or (
            continued is None and prompt_tail.rstrip().endswith(END_TAG)):
        return None
    return ThoughtTokens(start=start[0], end=end[0], opened=opening == "reasoning")


class ReasoningParser:
    def __init__(self, name: str, prompt_tail: str, constrained: bool = False, continued: str | None = None) -> None:
        """`constrained`: a grammar (response_format, a forced tool call) writes the answer from its first token
        (no thought_before_grammar), so it is a thought only if it opens with <think> itself. `continued`: see
        answer_opening."""
        if name not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}; one of {', '.join(REASONING_PARSERS)}")
        # start: may open with <think>; reasoning: inside the block; content: after it (or never in one)
        self._state = answer_opening(name, prompt_tail, continued)
        if constrained and self._state == "reasoning":
            self._state = "start"
        # a <think> the model writes anyway, where the template opened the block, is dropped
        self._optional_start = self._state == "reasoning" and continued is None
        self._buffer = ""

    def feed(self, text: str) -> SplitText:
        split = SplitText()
        self._buffer += text
        if self._state == "start" or self._optional_start:
            opening = self._buffer.lstrip()
            if START_TAG.startswith(opening) and len(opening) < len(START_TAG):
                return split  # space, or maybe the start of the tag: held
            if opening.startswith(START_TAG):
                self._buffer, self._state = opening[len(START_TAG):], "reasoning"
            elif self._state == "start":
                self._state = "content"
            self._optional_start = False
        if self._state == "reasoning":
            end = self._buffer.find(END_TAG)
            if end < 0:
                cut = len(self._buffer) - partial_tag_length(self._buffer, END_TAG)
                split.reasoning, self._buffer = self._buffer[:cut], self._buffer[cut:]
                return split
            split.reasoning, self._buffer = self._buffer[:end], self._buffer[end + len(END_TAG):]
            self._state = "content"
        split.content, self._buffer = self._buffer, ""
        return split

    def finish(self) -> SplitText:
        """The end of the output: what was held back, as the part it was held in."""
        held, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            return SplitText(reasoning=held)
        return SplitText(content=held)

