"""IncrementalDetokenizer against the real SmolLM2 tokenizer (byte-level BPE)."""
from __future__ import annotations

import random

import pytest

from sfllm.frontend.detokenizer import IncrementalDetokenizer
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.sampling_params import SamplingParams

IM_END = 2  # <|im_end|>, a special token of SmolLM2
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキスト、中文 你好世界，한국어",
    "Emoji 🎉🎉 family 👨‍👩‍👧 flag 🇫🇷 done",
    "café naïve — “quotes” ∑∫√ tabs\tand\n\nnew lines  double  spaces",
]


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": "Say something"}])


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int], chunk_sizes: list[int]) -> list[str]:
    chunks, position = [], 0
    for size in chunk_sizes:
        chunks.append(detokenizer.append(token_ids[position:position + size]))
        position += size
    chunks.append(detokenizer.append(token_ids[position:]))
    return chunks


def random_split(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(rng.randint(1, 4))
    return sizes


@pytest.mark.parametrize("text", TEXTS)
def test_any_split_streams_the_full_decode(tokenizer: Tokenizer, prompt: list[int], text: str) -> None:
    token_ids = tokenizer.encode(text)
    expected = tokenizer.decode(token_ids)
    rng = random.Random(text)
    for split in [[1] * len(token_ids), [len(token_ids)]] + [random_split(rng, len(token_ids)) for _ in range(20)]:
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
        chunks = stream(detokenizer, token_ids, split)
        chunks.append(detokenizer.flush())
        assert "".join(chunks) == expected
        assert detokenizer.text == expected
        assert detokenizer.num_tokens == len(token_ids)
        assert detokenizer.matched_stop is None


@pytest.mark.parametrize("text", ["你好世界", "🎉👨‍👩‍👧", "한국어 テキスト"])
def test_multi_token_characters_never_emit_a_replacement_character(tokenizer: Tokenizer, prompt: list[int],
                                                                   text: str) -> None:
    token_ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([t]) for t in token_ids), "the text must have multi-token characters"
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    chunks = [detokenizer.append([token_id]) for token_id in token_ids]
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) + detokenizer.flush() == text


@pytest.mark.parametrize("end", ["", "<|im_end|>"])
def test_generation_cut_inside_a_character_drops_its_first_bytes(tokenizer: Tokenizer, prompt: list[int],
                                                                  end: str) -> None:
    whole = tokenizer.encode("ok 🎉 你好 \ufffd")  # a U+FFFD the model wrote is text like any other
    assert tokenizer.decode(whole) == "ok 🎉 你好 \ufffd"
    cuts = [cut for cut in range(1, len(whole)) if tokenizer.decode(whole[:cut]).endswith("\ufffd")]
    assert tokenizer.token_bytes(whole[1]) == " 🎉".encode()[:3], "a token of a space and a first byte"
    # alone, OpenAI's logprobs show its bytes (\\xNN), vLLM's decoded_token the replacement character
    assert (tokenizer.token_text(whole[1]), tokenizer.token_decoded(whole[1])) == (" \\xf0\\x9f", " \ufffd")
    assert len(cuts) >= 4, "the emoji and the CJK characters take several tokens each"
    for cut in cuts:
        token_ids = whole[:cut] + tokenizer.encode(end)
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
        text = detokenizer.append(token_ids) + detokenizer.flush()
        assert "\ufffd" not in text, (cut, text)
        assert text == tokenizer.decode(token_ids).removesuffix("\ufffd"), cut


def test_a_replacement_character_the_model_wrote_is_kept(tokenizer: Tokenizer, prompt: list[int]) -> None:
    token_ids = tokenizer.encode("bad \ufffd")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    assert detokenizer.append(token_ids) + detokenizer.flush() == "bad \ufffd"


def test_prompt_ending_inside_a_character_does_not_eat_output(tokenizer: Tokenizer) -> None:
    token_ids = tokenizer.encode("🎉 party")
    detokenizer = IncrementalDetokenizer(tokenizer, token_ids[:1], SamplingParams())
    text = detokenizer.append(token_ids[1:]) + detokenizer.flush()
    assert text == tokenizer.decode(token_ids[1:])
    assert text.endswith(" party")


def test_stop_string_is_cut_and_ends_generation(tokenizer: Tokenizer, prompt: list[int]) -> None:
    token_ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=["fox"]))
    chunks = [detokenizer.append([token_id]) for token_id in token_ids]
    assert "".join(chunks) == "The quick brown "
    assert detokenizer.text == "The quick brown "
    assert detokenizer.matched_stop == "fox"
    assert detokenizer.num_tokens == 4  # The, quick, brown, fox
    assert detokenizer.flush() == ""
    assert detokenizer.append(tokenizer.encode(" more")) == ""
    assert detokenizer.num_tokens == 4


def test_stop_string_spanning_tokens(tokenizer: Tokenizer, prompt: list[int]) -> None:
    token_ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    stop = "own fox ju"
    assert not any(stop in tokenizer.decode([t]) for t in token_ids), "the stop string must span tokens"
    for chunk_size in (1, 2, 3, len(token_ids)):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=[stop]))
        text = "".join(stream(detokenizer, token_ids, [chunk_size] * (len(token_ids) // chunk_size)))
        assert text == "The quick br"
        assert detokenizer.num_tokens == 5  # the stop string completes inside " jumps"


def test_stop_string_is_kept_when_asked(tokenizer: Tokenizer, prompt: list[int]) -> None:
    token_ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    params = SamplingParams(stop=["own fox ju"], include_stop_str_in_output=True)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, params)
    chunks = [detokenizer.append([token_id]) for token_id in token_ids]
    assert "".join(chunks) == "The quick brown fox ju"
    assert detokenizer.matched_stop == "own fox ju"


def test_possible_stop_start_is_held_back_until_ruled_out(tokenizer: Tokenizer, prompt: list[int]) -> None:
    token_ids = tokenizer.encode("The quick brown fox jumps")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=["fox!"]))
    chunks = [detokenizer.append([token_id]) for token_id in token_ids]
    assert chunks == ["The", " quick", " brown", " ", "fox jumps"]  # "fox" could have become "fox!"
    assert detokenizer.matched_stop is None


def test_held_back_text_is_released_at_the_end(tokenizer: Tokenizer, prompt: list[int]) -> None:
    token_ids = tokenizer.encode("The quick brown fox")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=["fox!"]))
    assert detokenizer.append(token_ids) == "The quick brown "
    assert detokenizer.flush() == "fox"
    assert detokenizer.text == "The quick brown fox"


def test_earliest_stop_string_wins(tokenizer: Tokenizer, prompt: list[int]) -> None:
    token_ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=["lazy", "quick brown fox"]))
    assert detokenizer.append(token_ids) == "The "
    assert detokenizer.matched_stop == "quick brown fox"


def test_stop_string_of_multi_token_characters(tokenizer: Tokenizer, prompt: list[int]) -> None:
    token_ids = tokenizer.encode("中文 你好世界，再见")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=["世界"]))
    chunks = [detokenizer.append([token_id]) for token_id in token_ids]
    assert "".join(chunks) == "中文 你好"
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert detokenizer.matched_stop == "世界"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_skip_special_tokens(tokenizer: Tokenizer, prompt: list[int], skip_special_tokens: bool) -> None:
    token_ids = tokenizer.encode("Hello there") + [IM_END]
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, params)
    text = "".join(detokenizer.append([token_id]) for token_id in token_ids) + detokenizer.flush()
    assert text == ("Hello there" if skip_special_tokens else "Hello there<|im_end|>")


def test_ids_beyond_the_tokenizer_decode_as_nothing(tokenizer: Tokenizer, prompt: list[int]) -> None:
    beyond = tokenizer.num_known_tokens + 7
    token_ids = tokenizer.encode("Hello") + [beyond] + tokenizer.encode(" world")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    assert detokenizer.append(token_ids) + detokenizer.flush() == "Hello world"
    assert detokenizer.num_tokens == len(token_ids)



@pytest.mark.parametrize(("stop", "min_tokens", "text"), [
    ("fox", 0, "The "), ("fox", 1, "The "), ("fox", 2, "The fox and the "),
    ("fox", 5, "The fox and the fox ran, then the "),
    ("fox", 10, "The fox and the fox ran, then the fox slept."),
    (" and the f", 4, "The fox"), (" and the f", 5, "The fox and the fox ran, then the fox slept.")])
def test_a_stop_string_counts_only_where_it_ends_past_min_tokens(tokenizer: Tokenizer, prompt: list[int], stop: str,
                                                                 min_tokens: int, text: str) -> None:
    """vLLM's rule: a stop string that ends in the text of the first min_tokens tokens is passed over; one that
    starts there and ends after them counts ("The| fox| and| the| fox| ran|,| then| the| fox| slept|.")."""
    token_ids = tokenizer.encode("The fox and the fox ran, then the fox slept.")
    assert [tokenizer.decode([t]) for t in token_ids[:5]] == ["The", " fox", " and", " the", " fox"]
    for chunk_size in (1, 3):
        params = SamplingParams(stop=[stop], min_tokens=min_tokens, max_tokens=20)
        detokenizer = IncrementalDetokenizer(tokenizer, prompt, params)
        streamed = "".join(stream(detokenizer, token_ids, [chunk_size] * len(token_ids))) + detokenizer.flush()
        assert streamed == text, (min_tokens, chunk_size)
