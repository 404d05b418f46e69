"""vLLM's and SGLang's own constraint fields, read as `response_format` is: their clients send these.

    vLLM      `structured_outputs: {json | regex | choice | grammar | structural_tag | json_object}` (0.11 and
              later), and before it `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`
    SGLang    `json_schema` (the schema as JSON text), `regex`, `ebnf`, `structural_tag` (its JSON text)

A request sets at most one constraint, in whichever field; as in vLLM a field is set unless null, so `{}` is a
schema of any JSON value and `""` a regex of the empty text. vLLM's options that only pick or tune its grammar
backend are accepted and have no effect here (`disable_fallback`, `disable_any_whitespace`: JSON comes on one
line anyway, `disable_additional_properties`: properties a schema does not list are never written unless it
allows them, sfllm/structured_output.py, `guided_decoding_backend`); those that would change the output and that
sfllm does not implement are a 400 naming them; other keys of `structured_outputs` are ignored, as vLLM ignores
them (its own `_backend` when a client serializes its params).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from sfllm.sampling_params import InvalidSamplingParams, StructuredOutput, StructuredOutputsParams, constraint_of

# vLLM's older top-level fields, by the kind of constraint they ask for
_VLLM_FIELDS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}
_SGLANG_KINDS = {"json_schema": "json", "regex": "regex", "ebnf": "grammar", "structural_tag": "structural_tag"}
_STRUCTURED_OUTPUTS_KEYS = frozenset(field.name for field in dataclasses.fields(StructuredOutputsParams))


def other_server_constraints(extra: dict[str, Any]) -> list[tuple[str, StructuredOutput]]:
    """Each constraint the request's unknown fields ask for, with the field that asked; raises
    InvalidSamplingParams for a malformed or unsupported one."""
    found = []
    for kind, field in _VLLM_FIELDS.items():
        if extra.get(field) is not None:
            found.append((field, constraint_of(kind, extra[field], field)))
    if extra.get("guided_whitespace_pattern") not in (None, ""):
        raise InvalidSamplingParams("guided_whitespace_pattern", "guided_whitespace_pattern is not supported by "
                                                                 "this server")
    for field, kind in _SGLANG_KINDS.items():
        if extra.get(field) is not None:
            found.append((field, constraint_of(kind, extra[field], field)))
    options = extra.get("structured_outputs")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidSamplingParams("structured_outputs", "structured_outputs must be an object")
        params = StructuredOutputsParams(**{key: value for key, value in options.items()
                                            if key in _STRUCTURED_OUTPUTS_KEYS})
        found.extend(("structured_outputs", constraint) for constraint in params.constraints())
    return found
