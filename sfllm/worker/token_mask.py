"""Token masks on the worker: the scheduler's packed bitmask of a step's constrained rows and the requests'
allowed_token_ids, as one bitmask of the rows the eager sampler draws (sfllm.worker.sampler applies it)."""
from __future__ import annotations

import functools

import numpy as np
import torch

from sfllm.worker.pinned_staging import PinnedStaging

_ALL_ALLOWED = -1  # every bit of an int32 word set


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def packed_token_set(token_ids: list[int], vocab_size: int) -> np.ndarray:
    """The bitmask row [ceil(V / 32)] int32 whose set bits are exactly `token_ids`."""
    words = np.zeros(bitmask_words(vocab_size), dtype=np.uint32)
    ids = np.asarray(token_ids, dtype=np.int64)
    np.bitwise_or.at(words, ids >> 5, np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)))
    return words.view(np.int32)


class TokenBitmasks:
    """[len(drawn_rows), words] int32 on the device: the packed grammar mask's row for each grammar row, all bits
    set for the rest, and each row of a request with allowed_token_ids (a packed_token_set) limited to them.
    Every grammar row is a drawn row (a constrained row never keeps the graph's token).

    Staged in pinned buffers taken in turn, for an asynchronous copy: a grammar row's mask is on the critical
    path of an overlapped step. On a CPU device the bitmask is the buffer itself, read by the sampler before
    the buffer comes round again."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.words = bitmask_words(vocab_size)
        self.device = device
        self._staging = PinnedStaging(device, num_buffers=2)

    def bitmask(self, packed: memoryview | bytes | None, grammar_rows: list[int], drawn_rows: list[int],
                token_sets: list[np.ndarray | None] | None = None) -> torch.Tensor | None:
        """None where no drawn row is limited. `token_sets`: per drawn row, its request's allowed tokens or None."""
        limited = [(row, token_set) for row, token_set in enumerate(token_sets or []) if token_set is not None]
        if not grammar_rows and not limited:
            return None
        host = self._staging.take(len(drawn_rows) * self.words * 4).view(torch.int32).view(len(drawn_rows), -1)
        mask = host.numpy()
        grammar = np.frombuffer(packed or b"", dtype="<i4").reshape(len(grammar_rows), self.words)
        if grammar_rows == drawn_rows:  # the rows of a batch of constrained requests only: one plain copy
            mask[:] = grammar
        else:
            mask.fill(_ALL_ALLOWED)
            index_of = {row: index for index, row in enumerate(drawn_rows)}
            mask[[index_of[row] for row in grammar_rows]] = grammar
        for row, token_set in limited:
            mask[row] &= token_set
        if self.device.type != "cuda":
            return host
        bitmask = host.to(self.device, non_blocking=True)
        self._staging.copy_launched()
        return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`logits` [B, V] with -inf where the bit of the token is clear."""
    # bytes of little-endian words, each looked up as its 8 bits: half the time of shifting every word 32 ways
    allowed = _byte_bits(bitmask.device)[bitmask.view(torch.uint8).long()].flatten(1)
    vocab = logits.shape[1]
    if allowed.shape[1] < vocab:  # ids past the grammar's vocabulary: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    return torch.where(allowed[:, :vocab], logits, float("-inf"))


@functools.cache
def _byte_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: bit j of byte value b."""
    return ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).bool()
