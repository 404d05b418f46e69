"""Structured outputs as grammars of llguidance, the grammar engine sfllm uses.

Why llguidance (measured on the CI machine, SmolLM2's 49152-token vocabulary, a three-field JSON schema,
docs/performance.md): a matcher is ready 1.2 ms after its schema arrives and a token mask takes 43 us
(median); xgrammar masks faster (4 us) but compiles each schema for 12 ms and brings torch, transformers
and tvm-ffi along; outlines-core needs the vocabulary rebuilt as bytes by hand and compiles to a regex
index. llguidance is one dependency-free abi3 wheel (Python 3.11 and 3.12 alike), so the frontend can
check a schema without torch and the scheduler masks without it; it takes JSON schemas, regular
expressions and Lark grammars (with JSON schemas inside them: the tool-call grammars), and fills the
masks of a batch in parallel threads outside the GIL.
"""
from __future__ import annotations

import json
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from sfllm.sampling_params import InvalidSamplingParams, StructuredOutput


# JSON as json.dumps writes it, on one line: with free whitespace small models wander into blank lines. A
# `oneOf` whose branches llguidance cannot prove exclusive is taken as `anyOf`, as xgrammar and outlines do
# (Pydantic writes `oneOf` for its unions); without it such schemas would be refused.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True}


# keywords whose value is a subschema, a list of them, or a map of names to them (enum and const hold data)
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


_APPLICATORS = ("allOf", "anyOf", "oneOf", "$ref")


def without_unlisted_properties(schema: Any) -> Any:
    """The schema with `additionalProperties: false` where an object lists its properties and says nothing of
    others, as xgrammar's strict mode (vLLM's and SGLang's default) reads it: a model is not led to invent keys.
    An object whose properties other schemas may add to is left open: one beside `allOf`/`anyOf`/`oneOf`/`$ref`,
    the branches of an `allOf` or of a listing object's `anyOf`/`oneOf`, and a definition an `allOf` refers to
    (inheritance: closing the parts would refuse every instance of the whole)."""
    extended = {item["$ref"] for branches in _all_of_lists(schema) for item in branches
                if isinstance(item, dict) and isinstance(item.get("$ref"), str)}
    return _closed(schema, "#", extended, closable=True)


def _closed(schema: Any, path: str, extended: set[str], closable: bool) -> Any:
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties", *_APPLICATORS)
    if closable and "properties" in result and not any(key in result for key in open_keys) and path not in extended:
        result["additionalProperties"] = False
    for key in _SUBSCHEMA:
        if isinstance(result.get(key), list):  # `items` as a list: an older draft's tuple
            result[key] = [_closed(item, f"{path}/{key}/{i}", extended, True) for i, item in enumerate(result[key])]
        elif key in result:
            result[key] = _closed(result[key], f"{path}/{key}", extended, True)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(result.get(key), list):
            branch_closable = key == "prefixItems" or (key != "allOf" and "properties" not in result)
            result[key] = [_closed(item, f"{path}/{key}/{i}", extended, branch_closable)
                           for i, item in enumerate(result[key])]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(result.get(key), dict):
            result[key] = {name: _closed(item, f"{path}/{key}/{name}", extended, True)
                           for name, item in result[key].items()}
    return result


def _all_of_lists(schema: Any) -> list[list[Any]]:
    """Every `allOf` list in the schema, at any depth."""
    found = []
    if isinstance(schema, dict):
        if isinstance(schema.get("allOf"), list):
            found.append(schema["allOf"])
        for value in schema.values():
            found += _all_of_lists(value)
    elif isinstance(schema, list):
        for value in schema:
            found += _all_of_lists(value)
    return found


class InvalidGrammar(InvalidSamplingParams):
    """The schema, expression or grammar cannot constrain an output; the message says where."""


def grammar_of(structured_output: StructuredOutput, param: str = "response_format") -> str:
    """llguidance's grammar for the constraint; raises InvalidGrammar naming `param`."""
    kind, definition = structured_output.kind, structured_output.definition
    if kind == "json_schema":
        try:
            schema = json.loads(definition)
        except json.JSONDecodeError as error:
            raise InvalidGrammar(param, f"the JSON schema is not JSON: {error}") from None
        if not isinstance(schema, dict):
            raise InvalidGrammar(param, "the JSON schema must be an object")
    what = kind.replace("_", " ")
    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(without_unlisted_properties(schema),
                                                                    defaults=JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(definition)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(any_to_lark(definition))
    except Exception as error:  # what llguidance or the GBNF converter cannot encode (e.g. unpaired surrogates)
        raise InvalidGrammar(param, f"invalid {what}: {error}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidGrammar(param, f"invalid {what}: {error.strip()}")
    return grammar
