"""vLLM's and SGLang's own constraint fields, read as `response_format` is: their clients send these.

    vLLM      `structured_outputs: {json | regex | choice | grammar | json_object}` (0.11 and later), and
              before it `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`
    SGLang    `json_schema` (the schema as JSON text), `regex`, `ebnf`

A request sets at most one constraint, in whichever field; as in vLLM a field is set unless null, so `{}` is a
schema of any JSON value and `""` a regex of the empty text. vLLM's options that only pick or tune its grammar
backend are accepted and have no effect here (`disable_fallback`, `disable_any_whitespace`: JSON comes on one
line anyway, `disable_additional_properties`: properties a schema does not list are never written unless it
allows them, sfllm/structured_output.py, `guided_decoding_backend`); those that would change the output and that
sfllm does not implement are a 400 naming them; other keys of `structured_outputs` are ignored, as vLLM ignores
them (its own `_backend` when a client serializes its params).
"""
from __future__ import annotations

from typing import Any

from sfllm.sampling_params import InvalidSamplingParams, StructuredOutput

# vLLM's structured_outputs keys, and its older top-level fields, by what they ask for
_VLLM_KINDS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}
_VLLM_UNSUPPORTED = ("whitespace_pattern", "structural_tag")
_SGLANG_KINDS = {"json_schema": "json", "regex": "regex", "ebnf": "grammar"}


def other_server_constraints(extra: dict[str, Any]) -> list[tuple[str, StructuredOutput]]:
    """Each constraint the request's unknown fields ask for, with the field that asked; raises
    InvalidSamplingParams for a malformed or unsupported one."""
    found = []
    for kind, field in _VLLM_KINDS.items():
        if extra.get(field) is not None:
            found.append((field, _constraint(kind, extra[field], field)))
    if extra.get("guided_whitespace_pattern") not in (None, ""):
        raise InvalidSamplingParams("guided_whitespace_pattern", "guided_whitespace_pattern is not supported by "
                                                                 "this server")
    for field, kind in _SGLANG_KINDS.items():
        if extra.get(field) is not None:
            found.append((field, _constraint(kind, extra[field], field)))
    options = extra.get("structured_outputs")
    if options is not None:
        found.extend(("structured_outputs", constraint) for constraint in _vllm_structured_outputs(options))
    return found


def _vllm_structured_outputs(options: Any) -> list[StructuredOutput]:
    if not isinstance(options, dict):
        raise InvalidSamplingParams("structured_outputs", "structured_outputs must be an object")
    constraints = [_constraint(kind, options[kind], "structured_outputs") for kind in _VLLM_KINDS
                   if options.get(kind) is not None]
    json_object = options.get("json_object")
    if json_object is not None and not isinstance(json_object, bool):
        raise InvalidSamplingParams("structured_outputs", "structured_outputs.json_object must be true or false")
    if json_object:
        constraints.append(StructuredOutput.json_object())
    for name in _VLLM_UNSUPPORTED:
        if options.get(name) not in (None, ""):
            raise InvalidSamplingParams("structured_outputs", f"structured_outputs.{name} is not supported by this "
                                                              "server")
    if not constraints:
        raise InvalidSamplingParams("structured_outputs", "structured_outputs sets no constraint; give one of "
                                                          f"{', '.join([*_VLLM_KINDS, 'json_object'])}")
    return constraints


def _constraint(kind: str, value: Any, field: str) -> StructuredOutput:
    if kind == "json":
        if isinstance(value, (str, dict)):  # a string is the schema's JSON text, as SGLang's json_schema always is
            return StructuredOutput.json_schema(value)
        raise InvalidSamplingParams(field, f"{field}: a JSON schema is an object or its JSON text")
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(choice, str) for choice in value):
            raise InvalidSamplingParams(field, f"{field}: the choices are a non-empty list of strings")
        # one regular expression, the output exactly one of them (a Lark alternation of literals holds at most
        # 2,000 in llguidance)
        return StructuredOutput.regex("|".join(_literal(choice) for choice in dict.fromkeys(value)))
    if not isinstance(value, str):
        raise InvalidSamplingParams(field, f"{field} must be a string")
    return StructuredOutput.regex(value) if kind == "regex" else StructuredOutput.grammar(value)


# the characters a regular expression of llguidance (Rust's regex syntax) reads as syntax
_REGEX_SYNTAX = frozenset("\\.+*?()|[]{}^$#&-~")


def _literal(text: str) -> str:
    """`text` as a regular expression that matches it alone."""
    return "".join("\\" + char if char in _REGEX_SYNTAX else char for char in text)
