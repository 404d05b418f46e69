"""vLLM's `bad_words`: words the output may not contain, as token sequences, and the tokens they ban at a step.

A word is tokenized as it would start the text and as it would follow a space (most tokenizers give the two
different tokens); a sequence's last token is banned wherever the output so far ends with the rest of it, and a
one-token sequence is banned everywhere. So a word is kept out as the tokenizer would write it, not every way
of spelling it in pieces: vLLM's rule, except that the spaced form is kept out even where it takes another number
of tokens than the unspaced one (vLLM then drops it).
"""
from __future__ import annotations

from collections.abc import Callable


def bad_words_token_ids(words: list[str], encode: Callable[[str], list[int]]) -> list[list[int]]:
    """The token sequences of `words` (`encode`: text -> ids, without special tokens), each once."""
    sequences: list[list[int]] = []
    for word in words:
        word = word.lstrip()
        for text in (word, " " + word):
            ids = encode(text) if word else []
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def banned_next_tokens(sequences: list[list[int]], output: list[int]) -> list[int]:
    """The tokens the next draw may not take after `output`: each sequence's last, where the output ends with
    the rest of it."""
    banned = []
    for sequence in sequences:
        prefix = len(sequence) - 1
        if prefix == 0 or (len(output) >= prefix and output[-prefix:] == sequence[:-1]):
            banned.append(sequence[-1])
    return banned
