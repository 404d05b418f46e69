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

import functools
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from sfllm.sampling_params import InvalidSamplingParams, StructuredOutput
from sfllm.structural_tag import structural_tag_lark


# JSON as json.dumps writes it, on one line: with free whitespace small models wander into blank lines. A
# `oneOf` whose branches llguidance cannot prove exclusive is taken as `anyOf`, as xgrammar and outlines do
# (Pydantic writes `oneOf` for its unions); without it such schemas would be refused.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "coerce_one_of": True}


# keywords whose value is a subschema, a list of them, or a map of names to them (enum and const hold data)
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# what may add properties to an object beside its own list: it stays open
_EXTENDERS = ("allOf", "anyOf", "oneOf", "$ref", "if", "then", "else", "dependentSchemas",
              "additionalProperties", "patternProperties", "unevaluatedProperties")


def without_unlisted_properties(schema: Any) -> Any:
    """The schema with `additionalProperties: false` where an object lists its properties and says nothing of
    others, as xgrammar's strict mode (vLLM's and SGLang's default) reads it: a model is not led to invent keys.
    An object whose properties other schemas may add to is left open: one beside an applicator, the branches of
    an `allOf` or of a listing object's `anyOf`/`oneOf`, and a definition referred to anywhere but as a whole
    subschema (inheritance: closing the parts would refuse every instance of the whole). A schema too deep to
    walk is left as it is."""
    try:
        extended = _extended_definitions(schema)
        return _closed(schema, (), extended, closable=True)
    except RecursionError:
        return schema


def _closed(schema: Any, path: tuple[str, ...], extended: set[tuple[str, ...]], closable: bool) -> Any:
    if not isinstance(schema, dict):
        return schema
    result = dict(schema)
    if closable and "properties" in result and not any(key in result for key in _EXTENDERS) \
            and path not in extended:
        result["additionalProperties"] = False
    for key in _SUBSCHEMA:
        if isinstance(result.get(key), list):  # `items` as a list: an older draft's tuple
            result[key] = [_closed(item, (*path, key, str(i)), extended, True) for i, item in enumerate(result[key])]
        elif key in result:
            result[key] = _closed(result[key], (*path, key), extended, key not in ("then", "else"))
    for key in _SUBSCHEMA_LISTS:
        if isinstance(result.get(key), list):
            branch_closable = key == "prefixItems" or (key != "allOf" and "properties" not in result)
            result[key] = [_closed(item, (*path, key, str(i)), extended, branch_closable)
                           for i, item in enumerate(result[key])]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(result.get(key), dict):
            result[key] = {name: _closed(item, (*path, key, name), extended, key != "dependentSchemas")
                           for name, item in result[key].items()}
    return result


def _extended_definitions(schema: Any) -> set[tuple[str, ...]]:
    """The paths of the schemas a `$ref` reaches other than as a whole subschema (a property's, an item's), and
    those they refer to in turn."""
    other: list[tuple[str, ...]] = []

    def visit(node: Any, as_whole: bool) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and not (as_whole and len(node.keys() - _ANNOTATIONS) == 1):
                other.append(_pointer(ref))
            for key, value in node.items():
                if key in ("enum", "const", "default", "examples"):
                    continue
                in_map = key in ("properties", "$defs", "definitions") and isinstance(value, dict)
                for item in value.values() if in_map else [value]:
                    visit(item, in_map or key in ("items", "additionalProperties"))
        elif isinstance(node, list):
            for item in node:
                visit(item, False)

    visit(schema, True)
    extended = set(other)
    for path in other:  # a reference on to another: that one is extended too
        target = _at(schema, path)
        while isinstance(target, dict) and isinstance(target.get("$ref"), str):
            path = _pointer(target["$ref"])
            if path in extended:
                break
            extended.add(path)
            target = _at(schema, path)
    return extended


_ANNOTATIONS = {"description", "title", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment"}


def _pointer(ref: str) -> tuple[str, ...]:
    """A local `$ref`'s path ("#/$defs/a~1b" -> ("$defs", "a/b")); () for the root, or for a ref elsewhere."""
    if not ref.startswith("#"):
        return ()
    parts = unquote(ref[1:]).split("/")[1:]
    return tuple(part.replace("~1", "/").replace("~0", "~") for part in parts)


def _at(schema: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if isinstance(schema, dict):
            schema = schema.get(part)
        elif isinstance(schema, list) and part.isdigit() and int(part) < len(schema):
            schema = schema[int(part)]
        else:
            return None
    return schema


# how the engine names the output's constraint in its errors (OpenAI's field); the frontend names the field the
# client used instead (guided_json, tools, ...)
CONSTRAINT_PARAM = "response_format"


class InvalidGrammar(InvalidSamplingParams):
    """The schema, expression or grammar cannot constrain an output; the message says where."""


def grammar_of(structured_output: StructuredOutput, param: str = CONSTRAINT_PARAM,
               special_token: Callable[[str], int | None] | None = None) -> str:
    """llguidance's grammar for the constraint; raises InvalidGrammar naming `param`. `special_token(text)`: the id
    of the model's special token written `text`, or None (structural tags' strings); left out, every string is text,
    which checks the spec as well (a frontend's check, whose grammars are remembered: an agent sends its tools and
    schemas again and again, and ten strict tools take ~2 ms to write and check)."""
    kind, definition = structured_output.kind, structured_output.definition
    try:
        if special_token is None:
            return _checked_grammar(kind, definition)
        return _grammar(kind, definition, special_token)
    except _Refused as refused:
        raise InvalidGrammar(param, str(refused)) from None


class _Refused(ValueError):
    """What is wrong with a constraint, before InvalidGrammar names the field it came in."""


@functools.lru_cache(maxsize=256)
def _checked_grammar(kind: str, definition: str) -> str:
    return _grammar(kind, definition, lambda text: None)


def _grammar(kind: str, definition: str, special_token: Callable[[str], int | None]) -> str:
    if kind == "json_schema":
        try:
            schema = json.loads(definition)
        except json.JSONDecodeError as error:
            raise _Refused(f"the JSON schema is not JSON: {error}") from None
        if not isinstance(schema, dict):
            raise _Refused("the JSON schema must be an object")
    what = kind.replace("_", " ")
    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(without_unlisted_properties(schema),
                                                                    defaults=JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(definition)
        elif kind == "structural_tag":
            grammar = structural_tag_lark(definition, _closed_inline_json_schema, any_to_lark, special_token)
            if not grammar.startswith("{"):  # Lark alone; a list of grammars is llguidance's form already
                grammar = llguidance.LLMatcher.grammar_from_lark(grammar)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(any_to_lark(definition))
    except Exception as error:  # what llguidance or the GBNF converter cannot encode (e.g. unpaired surrogates)
        raise _Refused(f"invalid {what}: {error}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise _Refused(f"invalid {what}: {error.strip()}")
    return grammar


def inline_json_schema(schema: dict[str, Any]) -> str:
    """A schema to inline in a Lark grammar (`%json{...}`), its JSON to be written as response_format's is."""
    return json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def _closed_inline_json_schema(schema: dict[str, Any]) -> str:
    return inline_json_schema(without_unlisted_properties(schema))
