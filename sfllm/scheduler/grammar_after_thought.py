"""A grammar that applies once a thinking model's thought is over (a reasoning parser's request with a
structured output, as vLLM serves it): the tokens of the thought are free, the answer after it is constrained.

Phases, advanced by each output token:
    open        the output may open a thought with its first token, or start the answer: the mask is the
                grammar's plus the thought's start token
    thinking    every token is allowed; the thought's end token starts the grammar
    answering   the grammar's own mask and state
"""
from __future__ import annotations

import llguidance

from sfllm.sampling_params import ThoughtTokens


class GrammarAfterThought:
    """The matcher's interface as the scheduler uses it (consume_token, is_error, is_stopped, get_error), with
    the grammar held back until the thought ends."""

    def __init__(self, matcher: llguidance.LLMatcher, thought: ThoughtTokens) -> None:
        self.matcher = matcher
        self.thought = thought
        self.phase = "thinking" if thought.opened else "open"

    @property
    def masked_by_grammar(self) -> bool:
        """Whether the next token's mask is the grammar's (in the open phase, with the start token added)."""
        return self.phase != "thinking"

    def consume_token(self, token: int) -> bool:
        if self.phase == "thinking":
            if token == self.thought.end:
                self.phase = "answering"
            return True
        if self.phase == "open":
            if token == self.thought.start:
                self.phase = "thinking"
                return True
            self.phase = "answering"
        return self.matcher.consume_token(token)

    def is_error(self) -> bool:
        return self.matcher.is_error()

    def is_stopped(self) -> bool:
        return self.phase == "answering" and self.matcher.is_stopped()

    def get_error(self) -> str:
        return self.matcher.get_error()
