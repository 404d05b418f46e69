"""A tag that a stream's text may split over several deltas: how much of its end to hold back."""
from __future__ import annotations


def partial_tag_length(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag` (0: none could)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
