"""vLLM's bad_words as token sequences, and the tokens they ban after a given output."""
from __future__ import annotations

from sfllm.bad_words import bad_words_token_ids, banned_next_tokens

# a tokenizer of words: a word alone is two tokens, a word after a space one, as "hello" and " hello" often are
VOCABULARY = {"hello": [7, 8], " hello": [9], "a": [1], " a": [2], "x y": [3, 4], " x y": [5, 3, 4]}


def test_each_word_is_banned_as_it_starts_the_text_and_as_it_follows_a_space() -> None:
    assert bad_words_token_ids(["hello", "  a", " hello", "x y"], VOCABULARY.__getitem__) == [
        [7, 8], [9], [1], [2], [3, 4], [5, 3, 4]]
    assert bad_words_token_ids(["   "], VOCABULARY.__getitem__) == [], "a blank word bans nothing"


def test_a_sequence_bans_its_last_token_where_the_output_ends_with_the_rest() -> None:
    sequences = [[7, 8], [9], [5, 3, 4]]
    assert banned_next_tokens(sequences, []) == [9], "one token: banned everywhere"
    assert banned_next_tokens(sequences, [1, 7]) == [8, 9]
    assert banned_next_tokens(sequences, [7, 1]) == [9]
    assert banned_next_tokens(sequences, [5, 3]) == [9, 4]
    assert banned_next_tokens(sequences, [3]) == [9], "the output must end with the whole rest"
