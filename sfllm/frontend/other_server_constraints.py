"""vLLM's and SGLang's own constraint fields, read as `response_format` is: their clients send these.

    vLLM      `structured_outputs: {json | regex | choice | grammar | json_object}` (0.11 and later), and
              before it `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`
    SGLang    `json_schema` (the schema as JSON text), `regex`, `ebnf`

A request sets at most one constraint, in whichever field. vLLM's options that only pick or tune its grammar
backend are accepted and have no effect here (`disable_fallback`, `disable_any_whitespace`: JSON comes on one
line anyway, `guided_decoding_backend`); those that would change the output and that sfllm does not implement
are a 400 naming them.
"""
from __future__ import annotations

import json
from typing import Any

from sfllm.sampling_params import InvalidSamplingParams, StructuredOutput

# vLLM's structured_outputs keys, and its older top-level fields, by what they ask for
_VLLM_KINDS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}
_VLLM_NO_EFFECT = ("disable_fallback", "disable_any_whitespace", "guided_decoding_backend")
_VLLM_UNSUPPORTED = ("whitespace_pattern", "disable_additional_properties", "structural_tag")
_SGLANG_KINDS = {"json_schema": "json", "regex": "regex", "ebnf": "grammar"}


def other_server_constraints(extra: dict[str, Any]) -> list[tuple[str, StructuredOutput]]:
    """Each constraint the request's unknown fields ask for, with the field that asked; raises
    InvalidSamplingParams for a malformed or unsupported one."""
    found = []
    for kind, field in _VLLM_KINDS.items():
        if _is_set(extra.get(field)):
            found.append((field, _constraint(kind, extra[field], field)))
    if _is_set(extra.get("guided_whitespace_pattern")):
        raise InvalidSamplingParams("guided_whitespace_pattern", "guided_whitespace_pattern is not supported by "
                                                                 "this server")
    for field, kind in _SGLANG_KINDS.items():
        if _is_set(extra.get(field)):
            found.append((field, _constraint(kind, extra[field], field)))
    options = extra.get("structured_outputs")
    if _is_set(options):
        found.extend(("structured_outputs", constraint) for constraint in _vllm_structured_outputs(options))
    return found


def _vllm_structured_outputs(options: Any) -> list[StructuredOutput]:
    if not isinstance(options, dict):
        raise InvalidSamplingParams("structured_outputs", "structured_outputs must be an object")
    constraints = [_constraint(kind, options[kind], "structured_outputs") for kind in _VLLM_KINDS
                   if _is_set(options.get(kind))]
    if options.get("json_object"):
        constraints.append(StructuredOutput.json_object())
    for name in _VLLM_UNSUPPORTED:
        if _is_set(options.get(name)):
            raise InvalidSamplingParams("structured_outputs", f"structured_outputs.{name} is not supported by this "
                                                              "server")
    unknown = sorted(set(options) - set(_VLLM_KINDS) - {"json_object"} - set(_VLLM_NO_EFFECT)
                     - set(_VLLM_UNSUPPORTED))
    if unknown:
        raise InvalidSamplingParams("structured_outputs", f"structured_outputs has unknown keys {unknown}; it takes "
                                                          f"{', '.join([*_VLLM_KINDS, 'json_object'])}")
    if not constraints:
        raise InvalidSamplingParams("structured_outputs", "structured_outputs sets no constraint; give one of "
                                                          f"{', '.join([*_VLLM_KINDS, 'json_object'])}")
    return constraints


def _constraint(kind: str, value: Any, field: str) -> StructuredOutput:
    if kind == "json":
        if isinstance(value, str):
            return StructuredOutput.json_schema(value)  # JSON text, as SGLang's json_schema always is
        if isinstance(value, dict):
            return StructuredOutput.json_schema(value)
        raise InvalidSamplingParams(field, f"{field}: a JSON schema is an object or its JSON text")
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(choice, str) for choice in value):
            raise InvalidSamplingParams(field, f"{field}: the choices are a non-empty list of strings")
        # a Lark alternation of literals: the output is exactly one of them
        return StructuredOutput.grammar("start: " + " | ".join(json.dumps(choice) for choice in value))
    if not isinstance(value, str):
        raise InvalidSamplingParams(field, f"{field} must be a string")
    return StructuredOutput.regex(value) if kind == "regex" else StructuredOutput.grammar(value)


def _is_set(value: Any) -> bool:
    """As the request's other unsupported fields: null, false and empty values are no request."""
    return value not in (None, False, "", [], {})
