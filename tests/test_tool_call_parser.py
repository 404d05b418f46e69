"""ToolCallParser on whole and partial streams: the deltas of any split join into the whole answer's."""
from __future__ import annotations

import json
import random

import pytest

from sfllm.frontend.tool_call_parser import Llama3JsonToolCallParser, ToolCallParser

NESTED = ('<tool_call>\n{"name": "plan", "arguments": {"steps": [{"do": "a } ] \\" <tool_call>", "n": 1}, '
          '{"do": "b", "tags": ["x", {"y": null}]}], "ok": true}}\n</tool_call>')
TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')


def parse(pieces: list[str], parser: ToolCallParser | Llama3JsonToolCallParser | None = None,
          ) -> tuple[str, dict[int, str], dict[int, str], ToolCallParser | Llama3JsonToolCallParser]:
    """Content, names and arguments by call index, assembled from the deltas, as a streaming client does."""
    parser = parser or ToolCallParser()
    content, names, arguments = "", {}, {}
    for parsed in [parser.feed(piece) for piece in pieces] + [parser.finish()]:
        content += parsed.content
        for delta in parsed.tool_calls:
            if delta.name is not None:
                assert delta.index not in names, "a call's name comes once"
                names[delta.index] = delta.name
            arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
    return content, names, arguments, parser


def splits(text: str, seed: int) -> list[list[str]]:
    """The text whole, character by character, and cut at random places."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    return [[text], list(text), [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]]


@pytest.mark.parametrize("seed", range(3))
def test_nested_arguments_with_tags_and_brackets_inside_strings(seed: int) -> None:
    for pieces in splits(NESTED, seed):
        content, names, arguments, parser = parse(pieces)
        assert content == ""
        assert names == {0: "plan"}
        assert json.loads(arguments[0]) == json.loads(NESTED.split("\n")[1])["arguments"]
        assert [(c.name, c.arguments) for c in parser.calls] == [("plan", arguments[0])]


@pytest.mark.parametrize("seed", range(3))
def test_text_then_two_calls(seed: int) -> None:
    for pieces in splits(TWO_CALLS, seed):
        content, names, arguments, parser = parse(pieces)
        assert content == "Let me check."
        assert names == {0: "get_weather", 1: "get_time"}
        assert arguments == {0: '{"city": "Paris"}', 1: '{"zone": "CET"}'}
        assert len({call.id for call in parser.calls}) == 2 and all(c.id.startswith("call_") for c in parser.calls)


def test_split_inside_the_tag_holds_it_back_and_a_lookalike_is_text() -> None:
    parser = ToolCallParser()
    assert parser.feed("Hi <tool_").content == "Hi"
    assert parser.feed("box> there").content == " <tool_box> there"
    assert parser.finish().content == ""
    content, names, _, _ = parse(["2 < 3 and <", "tool", "_call>", '{"name": "f", "arguments": {}}</tool_call>'])
    assert (content, names) == ("2 < 3 and", {0: "f"})


def test_split_inside_a_string_with_escapes() -> None:
    text = '<tool_call>{"name": "say", "arguments": {"text": "a \\"quoted\\" }] word"}}</tool_call> done'
    cut = text.index("quoted")
    content, names, arguments, _ = parse([text[:cut], text[cut:cut + 3], text[cut + 3:]])
    assert names == {0: "say"}
    assert json.loads(arguments[0]) == {"text": 'a "quoted" }] word'}
    assert content == " done"


def test_arguments_before_the_name_come_whole_when_the_call_closes() -> None:
    text = '<tool_call>{"arguments": {"x": [1, 2]}, "name": "f"}</tool_call>'
    content, names, arguments, parser = parse(list(text))
    assert (content, names, json.loads(arguments[0])) == ("", {0: "f"}, {"x": [1, 2]})
    assert parser.calls[0].arguments == arguments[0]


def test_unfinished_or_malformed_calls() -> None:
    content, names, arguments, _ = parse(['<tool_call>{"name": "f", "arguments": {"a": [1, ', '2'])
    assert (content, names, arguments) == ("", {0: "f"}, {0: '{"a": [1, 2'})  # cut by max_tokens: as far as it got
    content, names, _, _ = parse(["<tool_call>not json</tool_call> after"])
    assert (content, names) == ("<tool_call>not json</tool_call> after", {})
    content, names, _, _ = parse(["<tool_call>{\"na"])
    assert (content, names) == ('<tool_call>{"na', {})
    # a second call cut before its name (max_tokens): dropped, not the answer's text
    content, names, _, _ = parse(['<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name":'])
    assert (content, names) == ("", {0: "f"})
    # a forced call (tool_choice required or named) cut before its name, or in its tag: nothing, not text
    for cut in ["<tool_call>\n", '<tool_call>\n{"na', "<tool_", "<tool_call>"]:
        assert parse([cut], ToolCallParser(forced=True))[:2] == ("", {}), cut
        assert parse([cut])[0] == cut, "unforced: the text as it came"
    # text after a call that merely names the tag is the answer's
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    content, names, _, _ = parse([call + '\nNote: <tool_call> is it.'])
    assert content.strip().startswith("Note:") and content.endswith("<tool_call> is it.") and names == {0: "f"}


def test_plain_text_passes_through_with_its_spacing() -> None:
    text = "Paris is the capital.\n\nIt has  two  spaces. "
    for pieces in splits(text, 0):
        assert parse(pieces)[0] == text


LLAMA3_CALLS = ('<|python_tag|>{"name": "plan", "parameters": {"steps": [{"do": "a } ] \\" ;", "n": 1}], "ok": true}}; '
                '{"name": "get_time", "parameters": {}}')


@pytest.mark.parametrize("seed", range(3))
def test_llama3_json_calls_split_anywhere(seed: int) -> None:
    for pieces in splits(LLAMA3_CALLS, seed):
        content, names, arguments, parser = parse(pieces, Llama3JsonToolCallParser())
        assert content == "" and names == {0: "plan", 1: "get_time"}, pieces
        assert json.loads(arguments[0]) == {"steps": [{"do": 'a } ] " ;', "n": 1}], "ok": True}
        assert arguments[1] == "{}"
        assert [(call.name, call.arguments) for call in parser.calls] == [("plan", arguments[0]), ("get_time", "{}")]


@pytest.mark.parametrize("text", ["The weather in Paris is mild.", '  {"answer": 42}', "<b>bold</b>", "<|python"])
def test_llama3_text_that_is_no_call_is_content(text: str) -> None:
    for pieces in splits(text, 0) if len(text) > 13 else [[text], list(text)]:
        content, names, _, parser = parse(pieces, Llama3JsonToolCallParser())
        assert (content, names, parser.calls) == (text, {}, []), pieces
