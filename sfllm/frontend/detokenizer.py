"""Streaming token ids to text: whole characters only, stop strings cut out."""
from __future__ import annotations

from sfllm.frontend.tokenizer import Tokenizer
from sfllm.sampling_params import SamplingParams

# Prompt tokens decoded in front of the output so the first output token gets the
# spacing it has in context (SentencePiece drops a leading space at the start of a text).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text as they arrive.

    Text is decoded over a sliding window of ids (`_prefix_offset`, `_read_offset`) so
    multi-token characters and context-dependent spacing come out as a full decode
    would; new text is released only once it no longer ends in a partial character.
    The released text is then searched for stop strings; whatever could still become
    the start of one is held back until it is ruled out.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stops = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        # a stop string counts only where it ends past the text of the first min_tokens tokens (vLLM's rule);
        # where that text ends is known once they have come
        self._min_tokens = params.min_tokens
        self._stops_from: int | None = 0 if params.min_tokens == 0 else None
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        if self._decode(0).endswith(_REPLACEMENT_CHAR):
            # A prompt ending inside a character would make the output's first bytes look decoded already.
            self._ids = []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode of the window's settled part, while it stays put
        self._decoded = ""  # output text of whole characters; after a stop, cut where it ends
        self._emitted = 0  # how much of `_decoded` is final
        self.matched_stop: str | None = None
        self.num_tokens = 0

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._decoded[:self._emitted]

    def append(self, token_ids: list[int]) -> str:
        """Consume new tokens; returns the text that became final. Ignores tokens after a stop."""
        emitted = self._emitted
        for token_id in token_ids:
            if self.matched_stop is not None:
                break
            self.num_tokens += 1
            self._ids.append(token_id)
            new_text = self._decode_complete_characters()
            self._decoded += new_text
            if self._stops_from is None and self.num_tokens == self._min_tokens:
                self._stops_from = len(self._decoded)
            if new_text:
                self._settle(len(self._decoded) - len(new_text), final=False)
        return self._decoded[emitted:self._emitted]

    def flush(self) -> str:
        """At the end of generation: release held-back text, except the first bytes of a character
        whose last bytes never came (they would read as U+FFFD)."""
        if self.matched_stop is not None:
            return ""
        emitted = self._emitted
        searched_from = len(self._decoded)
        settled_text = self._decode(self._prefix_offset, self._read_offset)
        whole_ids, whole_tail = self._tokenizer.without_cut_character(self._ids[self._read_offset:],
                                                                      self._skip_special_tokens)
        self._ids[self._read_offset:] = whole_ids
        self._decoded += self._decode(self._prefix_offset)[len(settled_text):] + whole_tail
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = None
        self._settle(searched_from, final=True)
        return self._decoded[emitted:self._emitted]

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def _decode_complete_characters(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset)
        if len(full_text) <= len(self._prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        new_text = full_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        return new_text

    def _settle(self, searched_from: int, final: bool) -> None:
        """Find a stop string in the new text, else emit all that cannot start one."""
        if not self._stops:
            self._emitted = len(self._decoded)
            return
        # A stop string that ends in the new text may start up to len(stop) - 1 characters before it.
        match = None
        if self._stops_from is not None:
            match = self._first_stop(max(0, searched_from - self._longest_stop + 1))
        if match is not None:
            position, stop = match
            self.matched_stop = stop
            self._decoded = self._decoded[:position + len(stop) if self._include_stop else position]
            self._emitted = len(self._decoded)
        elif final or self._include_stop:
            self._emitted = len(self._decoded)
        else:
            self._emitted = len(self._decoded) - self._stop_prefix_length()

    def _first_stop(self, window_start: int) -> tuple[int, str] | None:
        found: tuple[int, str] | None = None
        for stop in self._stops:
            position = self._decoded.find(stop, max(window_start, self._stops_from - len(stop) + 1))
            if position != -1 and (found is None or position < found[0]):
                found = (position, stop)
        return found

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._decoded)), longest, -1):
                if self._decoded.endswith(stop[:length]):
                    longest = length
                    break
        return longest
