"""Draft tokens for speculative decoding: guesses of a request's next tokens that one target step verifies.

`DraftProposer` is what the scheduler asks; `NgramProposer` (prompt lookup) needs no draft model: it finds
the request's last n tokens earlier in its prompt and output and proposes the tokens that followed them
there. A draft model (EAGLE and the like) would implement the same interface.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class DraftProposer(Protocol):
    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        """Up to `max_drafts` tokens guessed to follow `token_ids` (prompt and output so far); [] for none."""


class NgramProposer:
    """The most recent earlier occurrence of the longest suffix of `min_n`..`max_n` tokens: the tokens after it.

    A match d tokens back says the text repeats with period d: where the tokens after it run out before
    `max_drafts`, they repeat (a run of one token, "ab ab ab", a table rule) rather than stop short."""

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram bounds must satisfy 1 <= min_n <= max_n; got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        length = len(token_ids)
        if max_drafts <= 0 or length <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        # ends of earlier occurrences of the last token: every longer match ends at one of them
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            candidates = ends[ends >= n - 1]
            if candidates.size == 0:
                continue
            window = tokens[candidates[:, None] + np.arange(1 - n, 1)]  # [C, n]: the n tokens ending at each
            matches = candidates[(window == tokens[length - n:]).all(axis=1)]
            if matches.size:
                after = tokens[int(matches[-1]) + 1:]
                return np.resize(after, max_drafts).tolist()  # repeated where it is shorter
        return []
