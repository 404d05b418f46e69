"""Length-bucketed admission order: prompts of similar length are prefilled together."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

BUCKET_TOKENS = 64


class HasLength(Protocol):
    @property
    def num_tokens(self) -> int: ...


def order_by_length_bucket(requests: Sequence[HasLength], bucket_tokens: int = BUCKET_TOKENS) -> list:
    """Requests of the largest 64-token bucket first; buckets of equal size by their oldest
    request; within a bucket, the queue's own (arrival) order."""
    buckets: dict[int, list] = {}
    first_seen: dict[int, int] = {}
    for position, request in enumerate(requests):
        key = request.num_tokens // bucket_tokens
        buckets.setdefault(key, []).append(request)
        first_seen.setdefault(key, position)
    ordered_keys = sorted(buckets, key=lambda k: (-len(buckets[k]), first_seen[k]))
    return [request for key in ordered_keys for request in buckets[key]]
