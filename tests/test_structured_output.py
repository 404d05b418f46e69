"""What a constraint lets through, on the grammar engine with SmolLM2's tokenizer: vLLM's choices, JSON schemas'
unlisted properties (sfllm/structured_output.py), structural tags (sfllm/structural_tag.py) and strict tools."""
from __future__ import annotations

from typing import Any

import pytest

from sfllm.frontend.other_server_constraints import other_server_constraints
from sfllm.sampling_params import InvalidSamplingParams, StructuredOutput
from sfllm.scheduler.grammar_matchers import GrammarMatchers
from sfllm.structured_output import without_unlisted_properties


@pytest.fixture(scope="module")
def grammars(smollm_tokenizer_spec) -> GrammarMatchers:
    return GrammarMatchers(smollm_tokenizer_spec.tokenizer_json, smollm_tokenizer_spec.vocab_size, [2])


def allows(grammars: GrammarMatchers, tokenizer, structured_output: StructuredOutput, text: str) -> bool:
    """Whether the constraint allows `text` whole: every token of it, and an end right after."""
    matcher = grammars.matcher(structured_output)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    return matcher.validate_tokens(tokens) == len(tokens) and matcher.consume_tokens(tokens) and \
        matcher.is_accepting()


CHOICES = ['yes', 'no "maybe"', 'a\\b', 'line\nbreak\ttab', '😀 你好', '\u2028', '\x00', '\x7f', '', 'a', 'ab',
           '(x|y)*', '[^]$^.+?{2}#&-~', 'a']


def test_guided_choice_allows_each_choice_exactly(grammars: GrammarMatchers, tokenizer) -> None:
    """Quotes, backslashes, the regex syntax's characters, control characters, the empty text, one choice the
    start of another, a duplicate: each is allowed as it is, and nothing else."""
    [(_, choice)] = other_server_constraints({"guided_choice": CHOICES})
    for text in CHOICES:
        assert allows(grammars, tokenizer, choice, text), repr(text)
    for text in ["abc", "yes!", "x", "(x|y)", "no maybe", "a\\\\b"]:
        assert not allows(grammars, tokenizer, choice, text), repr(text)


def test_thousands_of_choices_compile(grammars: GrammarMatchers, tokenizer) -> None:
    """A Lark alternation of literals holds 2,000 in llguidance (a 500 at the first mask past it); a regex more."""
    [(_, choice)] = other_server_constraints({"guided_choice": [f"w{i}" for i in range(3000)]})
    assert allows(grammars, tokenizer, choice, "w2999") and not allows(grammars, tokenizer, choice, "w3000")


def test_a_schemas_object_gets_no_property_it_does_not_list(grammars: GrammarMatchers, tokenizer) -> None:
    """As xgrammar's strict mode (vLLM's and SGLang's default): unless the schema allows more."""
    listed = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert allows(grammars, tokenizer, StructuredOutput.json_schema(listed), '{"a": 1}')
    assert not allows(grammars, tokenizer, StructuredOutput.json_schema(listed), '{"a": 1, "b": 2}')
    more = {**listed, "additionalProperties": True}
    assert allows(grammars, tokenizer, StructuredOutput.json_schema(more), '{"a": 1, "b": 2}')
    assert allows(grammars, tokenizer, StructuredOutput.json_object(), '{"b": 2}'), "an object with no list: any"


def test_unlisted_properties_are_closed_through_subschemas_and_data_is_left_alone() -> None:
    schema = {"$defs": {"pet": {"properties": {"kind": {"enum": [{"properties": {}}]}}}},
              "properties": {"properties": {"type": "object", "properties": {"x": {}}},
                             "pets": {"type": "array", "items": {"$ref": "#/$defs/pet"}},
                             "free": {"properties": {}, "additionalProperties": {"properties": {"y": {}}}},
                             "patterned": {"properties": {}, "patternProperties": {"^z": {}}},
                             "either": {"anyOf": [{"properties": {}}, {"type": "string"}]}}}
    closed = without_unlisted_properties(schema)
    assert closed["additionalProperties"] is False
    assert closed["$defs"]["pet"]["additionalProperties"] is False
    assert closed["$defs"]["pet"]["properties"]["kind"] == {"enum": [{"properties": {}}]}, "enum values are data"
    assert closed["properties"]["properties"]["additionalProperties"] is False, "a property named properties"
    assert "additionalProperties" not in closed["properties"]
    assert closed["properties"]["free"]["additionalProperties"] == {"properties": {"y": {}},
                                                                    "additionalProperties": False}
    assert "additionalProperties" not in closed["properties"]["patterned"]
    either = closed["properties"]["either"]
    assert either["anyOf"][0]["additionalProperties"] is False and either["anyOf"][1] == {"type": "string"}
    assert "additionalProperties" not in schema, "the client's schema is not changed"


def test_a_forced_tool_calls_arguments_get_no_parameter_the_tool_does_not_list(grammars: GrammarMatchers,
                                                                                tokenizer) -> None:
    from sfllm.frontend.openai_protocol import ChatCompletionRequest
    from sfllm.frontend.tools import ChatTools
    body = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}}}}]})
    forced = ChatTools(body).structured_output("hermes")
    call = '<tool_call>\n{{"name": "f", "arguments": {arguments}}}\n</tool_call>'
    assert allows(grammars, tokenizer, forced, call.format(arguments='{"a": 1}'))
    assert not allows(grammars, tokenizer, forced, call.format(arguments='{"a": 1, "b": 2}'))


def strict_tools_grammar(call_format: str, **request: Any) -> StructuredOutput | None:
    from sfllm.frontend.openai_protocol import ChatCompletionRequest
    from sfllm.frontend.tools import ChatTools
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
        {"type": "function", "function": {"name": "g"}}], **request})
    return ChatTools(body).structured_output(call_format)


def test_strict_tools_bind_each_call_the_model_opens_under_tool_choice_auto(grammars: GrammarMatchers,
                                                                             tokenizer) -> None:
    """OpenAI's `strict` under `auto`, as SGLang reads it: free text, and each call names a tool and gives its
    schema's arguments (any object for a tool not strict); parallel_tool_calls false: one call, last."""
    tags = strict_tools_grammar("hermes")
    call = '<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'
    f_call, g_call = call.format(name="f", arguments='{"a": 1}'), call.format(name="g", arguments='{"z": [1]}')
    for text in ["No call needed.", f_call, f"Let me check. {f_call}\n{g_call} Done."]:
        assert allows(grammars, tokenizer, tags, text), repr(text)
    for text in [call.format(name="f", arguments='{"a": "one"}'), call.format(name="f", arguments='{"a": 1, "b": 2}'),
                 call.format(name="h", arguments="{}"), call.format(name="g", arguments="[1]")]:
        assert not allows(grammars, tokenizer, tags, text), repr(text)
    single = strict_tools_grammar("hermes", parallel_tool_calls=False)
    assert allows(grammars, tokenizer, single, f"Sure. {f_call}")
    assert not allows(grammars, tokenizer, single, f"{f_call} more") and \
        not allows(grammars, tokenizer, single, f"{f_call}\n{g_call}")
    llama = strict_tools_grammar("llama3_json")
    assert allows(grammars, tokenizer, llama, '{"name": "f", "parameters": {"a": 2}}')
    assert not allows(grammars, tokenizer, llama, '{"name": "f", "parameters": {"a": "x"}}')
    assert strict_tools_grammar("hermes", response_format={"type": "json_object"}) is None, "the request's own wins"
    assert strict_tools_grammar("hermes", tool_choice="none") is None


BASE = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}


@pytest.mark.parametrize("schema, text", [
    # an object split over allOf's branches (zod/TypeBox intersections)
    ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}, '{"a": 1, "b": 2}'),
    # inheritance: a definition extended through allOf
    ({"$defs": {"Base": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}},
      "allOf": [{"$ref": "#/$defs/Base"}], "properties": {"name": {"type": "string"}}, "required": ["name"]},
     '{"id": 1, "name": "x"}'),
    # a listing object whose anyOf branches list some of its properties
    ({"type": "object", "properties": {"kind": {"type": "string"}, "x": {"type": "integer"}}, "required": ["kind"],
      "anyOf": [{"properties": {"kind": {"const": "a"}}}, {"properties": {"kind": {"const": "b"}}}]},
     '{"kind": "a", "x": 1}'),
    # pydantic's wrapper of a field with a default: allOf of one $ref
    ({"$defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
      "type": "object", "properties": {"pet": {"allOf": [{"$ref": "#/$defs/Pet"}], "default": None}}},
     '{"pet": {"name": "x"}}'),
    # a $ref beside the object's own properties, through a chain, inside an anyOf inside an allOf, as a listing
    # object's anyOf branch, and to a definition whose name needs escaping
    ({"$defs": {"Base": BASE}, "$ref": "#/$defs/Base", "properties": {"name": {"type": "string"}},
      "required": ["name"]}, '{"id": 1, "name": "x"}'),
    ({"$defs": {"A": {"$ref": "#/$defs/B"}, "B": BASE}, "allOf": [{"$ref": "#/$defs/A"}],
      "properties": {"name": {"type": "string"}}, "required": ["name"]}, '{"id": 1, "name": "x"}'),
    ({"$defs": {"C": BASE}, "allOf": [{"anyOf": [{"$ref": "#/$defs/C"}]}],
      "properties": {"name": {"type": "string"}}, "required": ["name"]}, '{"id": 1, "name": "x"}'),
    ({"$defs": {"K": {"type": "object", "properties": {"kind": {"const": "a"}}}}, "type": "object",
      "properties": {"kind": {"type": "string"}, "x": {"type": "integer"}}, "anyOf": [{"$ref": "#/$defs/K"}]},
     '{"kind": "a", "x": 1}'),
    ({"$defs": {"a/b": BASE}, "allOf": [{"$ref": "#/$defs/a~1b"}], "properties": {"name": {"type": "string"}},
      "required": ["name"]}, '{"id": 1, "name": "x"}'),
])
def test_objects_other_schemas_extend_stay_open(grammars: GrammarMatchers, tokenizer, schema, text: str) -> None:
    """Closing each part of a whole would refuse every instance of the whole (JSON Schema's allOf pitfall)."""
    assert allows(grammars, tokenizer, StructuredOutput.json_schema(schema), text)


def test_a_schema_too_deep_to_walk_is_left_as_it_is() -> None:
    deep: dict = {"type": "string"}
    for _ in range(5000):
        deep = {"type": "object", "properties": {"a": deep}}
    assert without_unlisted_properties(deep) is deep


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}


def test_a_structural_tag_is_free_text_until_a_trigger_then_the_structure_it_begins(grammars: GrammarMatchers,
                                                                                     tokenizer) -> None:
    """vLLM's and SGLang's structures and triggers: two functions behind one text trigger, and a trigger that is
    one of the model's special tokens (SmolLM2's `<|im_start|>`), matched as that token."""
    triggers = ["<function=", "<|im_start|>"]
    [(_, tags)] = other_server_constraints({"structural_tag": {"triggers": triggers, "structures": [
        {"begin": "<function=weather>", "schema": WEATHER, "end": "</function>"},
        {"begin": "<function=time>", "schema": TIME, "end": "</function>"},
        {"begin": "<|im_start|>n=", "schema": {"type": "integer"}, "end": ""}]}})
    for text in ["", "No call.\n\nNone at all.", 'a <function=weather>{"city": "Paris"}</function> and '
                 '<function=time>{"zone": "UTC"}</function>, done', 'x <|im_start|>n=42 y']:
        assert allows(grammars, tokenizer, tags, text), repr(text)
    for text in ['<function=weather>{"city": "Paris", "zone": "UTC"}</function>',  # a property the schema lacks
                 '<function=weather>{"zone": "UTC"}</function>', '<function=other>{}</function>',
                 '<function=weather>{"city": "Paris"}', '<function=weather>{"city": "Paris"}</func>',
                 'x <|im_start|>n=four', 'x <|im_start|>']:
        assert not allows(grammars, tokenizer, tags, text), repr(text)


def test_an_end_or_begin_naming_a_special_token_is_that_token(grammars: GrammarMatchers, tokenizer) -> None:
    """As Llama 3.1's `<|python_tag|>` call ends with `<|eom_id|>`: SmolLM2's `<|im_start|>` and `<file_sep>` here,
    after a value of a schema and after text that can be anything."""
    legacy = StructuredOutput.structural_tag({"triggers": ["<|im_start|>"], "structures": [
        {"begin": "<|im_start|>", "schema": {"type": "integer"}, "end": "<file_sep>"}]})
    assert allows(grammars, tokenizer, legacy, "a <|im_start|>42<file_sep> b")
    assert not allows(grammars, tokenizer, legacy, "a <|im_start|>42") and \
        not allows(grammars, tokenizer, legacy, "a <|im_start|>42 <file_sep>")
    formatted(grammars, tokenizer, {"type": "tag", "begin": "<|im_start|>", "content": {"type": "any_text"},
                                    "end": ["<file_sep>", "."]},
              ["<|im_start|>any text<file_sep>", "<|im_start|>any text."], ["<|im_start|>any text", "any text."])


def test_a_text_trigger_is_found_inside_a_token(grammars: GrammarMatchers, tokenizer) -> None:
    """A trigger is text, not a token: " is" inside " island" opens the structure there, so " island" cannot be
    written, while a text never writing the trigger is free."""
    tags = StructuredOutput.structural_tag({"triggers": [" is"], "structures": [
        {"begin": " is", "schema": {"type": "integer"}, "end": "!"}]})
    assert allows(grammars, tokenizer, tags, "It is7! An apple") and allows(grammars, tokenizer, tags, "Paris")
    assert allows(grammars, tokenizer, tags, "An is12!land")
    assert not allows(grammars, tokenizer, tags, "An island") and not allows(grammars, tokenizer, tags, "It is 7!")


def formatted(grammars: GrammarMatchers, tokenizer, format_: dict, accepted: list[str], refused: list[str]) -> None:
    """xgrammar's `format` form of a structural tag: each text of `accepted` allowed whole, none of `refused`."""
    [(_, tags)] = other_server_constraints({"structural_tag": {"type": "structural_tag", "format": format_}})
    for text in accepted:
        assert allows(grammars, tokenizer, tags, text), repr(text)
    for text in refused:
        assert not allows(grammars, tokenizer, tags, text), repr(text)


def weather_tag(end: str = "</function>") -> dict:
    return {"type": "tag", "begin": "<function=weather>", "content": {"type": "json_schema", "json_schema": WEATHER},
            "end": end}


def test_a_format_thought_then_text_with_tool_calls(grammars: GrammarMatchers, tokenizer) -> None:
    """A thought of any text (it stops at its tag's end, and may hold a trigger), then text with calls."""
    format_ = {"type": "sequence", "elements": [
        {"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"},
        {"type": "triggered_tags", "triggers": ["<function="], "tags": [weather_tag()]}]}
    formatted(grammars, tokenizer, format_,
              ["<think></think>", "<think>call <function=x> later?</think>Sure: <function=weather>"
               '{"city": "Oslo"}</function> done', "<think>a\nb</think>no call"],
              ["no thought", "<think>never closed", '<think>x</think><function=weather>{"city": 1}</function>',
               "<think>x</think> <function=other>"])


def test_a_formats_triggered_tags_flags_read_as_xgrammar_reads_them(grammars: GrammarMatchers, tokenizer) -> None:
    tags = {"type": "triggered_tags", "triggers": ["<function="], "tags": [weather_tag()]}
    call = '<function=weather>{"city": "Oslo"}</function>'
    formatted(grammars, tokenizer, {**tags, "at_least_one": True}, [call, f"{call} and {call}", f"{call} text"],
              ["text first " + call, "", "text"])
    formatted(grammars, tokenizer, {**tags, "stop_after_first": True}, [f"text {call}", "just text", call],
              [f"{call} more", f"{call}{call}"])
    formatted(grammars, tokenizer, {**tags, "at_least_one": True, "stop_after_first": True}, [call],
              [f"a {call}", f"{call} b", "text"])
    formatted(grammars, tokenizer, {**tags, "excludes": ["STOP"]}, [f"a {call} b"], [f"a STOP {call}", "STOP"])


def test_a_formats_fixed_parts_and_repetitions(grammars: GrammarMatchers, tokenizer) -> None:
    """const_string, regex (a slash in it), a nested grammar (GBNF), or, optional, repeat, and tags with a
    separator."""
    format_ = {"type": "sequence", "elements": [
        {"type": "const_string", "value": "date: "}, {"type": "regex", "pattern": r"[0-9]{2}/[0-9]{2}"},
        {"type": "optional", "content": {"type": "const_string", "value": "!"}},
        {"type": "or", "elements": [{"type": "const_string", "value": " yes"},
                                    {"type": "grammar", "grammar": 'root ::= " n" "o"+'}]},
        {"type": "repeat", "min": 1, "max": 2, "content": {"type": "const_string", "value": "."}},
        {"type": "tags_with_separator", "separator": ", ", "tags": [weather_tag("]")], "at_least_one": True}]}
    call = '<function=weather>{"city": "Oslo"}]'
    formatted(grammars, tokenizer, format_, [f"date: 12/31 yes.{call}", f"date: 01/02! nooo..{call}, {call}"],
              [f"date: 12-31 yes.{call}", f"date: 12/31 maybe.{call}", f"date: 12/31 yes...{call}",
               "date: 12/31 yes.", f"date: 12/31 yes.{call}{call}"])


def test_any_text_at_the_outputs_end_keeps_out_its_excludes(grammars: GrammarMatchers, tokenizer) -> None:
    formatted(grammars, tokenizer, {"type": "any_text", "excludes": ["<|", "//"]}, ["", "free text/ here"],
              ["a <| b", "http://x"])


def test_a_frontends_check_remembers_a_grammar_and_refuses_a_bad_one_every_time() -> None:
    """grammar_of without a tokenizer (the frontends' check of every request) writes a constraint's grammar once."""
    from sfllm.structured_output import InvalidGrammar, _checked_grammar, grammar_of
    tags = StructuredOutput.structural_tag({"triggers": ["<f"], "structures": [{"begin": "<f>", "end": "</f>"}]})
    first = grammar_of(tags)
    hits = _checked_grammar.cache_info().hits
    assert grammar_of(tags, param="tools") == first and _checked_grammar.cache_info().hits == hits + 1
    bad = StructuredOutput.regex("a(")
    for param in ("guided_regex", "regex"):
        with pytest.raises(InvalidGrammar, match="invalid regex") as error:
            grammar_of(bad, param=param)
        assert error.value.param == param


def test_a_formats_edges_found_in_review(grammars: GrammarMatchers, tokenizer) -> None:
    """A sequence ending in a constant inside a tag keeps the tag's end; text anywhere in a tag stays out of its
    end; optional or repeated any text; an empty end beside another; repeat up to 0."""
    number = {"type": "json_schema", "json_schema": {"type": "integer"}}
    any_text = {"type": "any_text"}

    def tag(content: dict, end: str | list[str]) -> dict:
        return {"type": "tag", "begin": "<a>", "content": content, "end": end}

    def const(value: str) -> dict:
        return {"type": "const_string", "value": value}

    formatted(grammars, tokenizer, tag({"type": "sequence", "elements": [number, const("!")]}, "</a>"),
              ["<a>1!</a>"], ["<a>1!", "<a>1</a>"])
    formatted(grammars, tokenizer, tag({"type": "sequence", "elements": [any_text, const("X"), number]}, "</a>"),
              ["<a>pqX1</a>"], ["<a>p</a>qX1</a>"])
    formatted(grammars, tokenizer, {"type": "optional", "content": any_text}, ["", "text"], [])
    formatted(grammars, tokenizer, tag({"type": "star", "content": any_text}, "</a>"), ["<a></a>", "<a>x y</a>"],
              ["<a>x</a>y</a>"])
    formatted(grammars, tokenizer, tag(any_text, ["", "</a>"]), ["<a>foo", "<a>foo</a>"], ["<a>foo</a>bar"])
    formatted(grammars, tokenizer, {"type": "sequence", "elements": [
        {"type": "repeat", "min": 0, "max": 0, "content": const("z")}, const("y")]}, ["y"], ["zy"])


def test_legacy_triggers_one_the_prefix_of_another_open_each_structure(grammars: GrammarMatchers,
                                                                      tokenizer) -> None:
    """A structure is opened by the shortest trigger its begin starts with: "<f" appears first in "<func=a>"."""
    tags = StructuredOutput.structural_tag({"triggers": ["<func", "<f"], "structures": [
        {"begin": "<func=a>", "schema": {"type": "integer"}, "end": "</func>"},
        {"begin": "<fx>", "schema": {"type": "integer"}, "end": "</fx>"}]})
    assert allows(grammars, tokenizer, tags, "hi <func=a>1</func> and <fx>2</fx>")
    assert not allows(grammars, tokenizer, tags, "hi <fun>1</func>")


def test_a_schema_nested_past_pythons_encoder_is_a_400_not_a_crash() -> None:
    """A spec given as an object (JSON text this deep would fail to parse first): the kept tree's encoding fails."""
    deep: dict = {}
    for _ in range(1200):
        deep = {"items": deep}
    spec = {"triggers": ["<f"], "structures": [{"begin": "<f>", "end": "</f>", "schema": deep}]}
    with pytest.raises(InvalidSamplingParams, match="structural tag"):
        StructuredOutput.structural_tag(spec, "structural_tag")


def test_a_repeated_constraint_gets_its_own_matcher_copied_at_the_start(smollm_tokenizer_spec, tokenizer) -> None:
    """The scheduler keeps a matcher at the start of each recent grammar and copies it for the next request with
    that constraint: the copy starts where a build would, and advancing one request's matcher leaves the next's."""
    grammars = GrammarMatchers(smollm_tokenizer_spec.tokenizer_json, smollm_tokenizer_spec.vocab_size, [2])
    schema = StructuredOutput.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    first = grammars.matcher(schema)
    assert len(grammars._started) == 1
    start_mask = bytes(first.compute_bitmask())
    for token in tokenizer.encode('{"a": 1', add_special_tokens=False):
        assert first.consume_token(token)
    second = grammars.matcher(schema)
    assert len(grammars._started) == 1, "the second request copied the kept matcher"
    assert bytes(second.compute_bitmask()) == start_mask != bytes(first.compute_bitmask())
    assert allows(grammars, tokenizer, schema, '{"a": 2}') and not allows(grammars, tokenizer, schema, '{"b": 2}')
