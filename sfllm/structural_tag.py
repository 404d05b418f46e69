"""Structural tags: free text in which each tool call, once the model starts one, follows its schema.

vLLM and SGLang take them as `response_format: {"type": "structural_tag", "structures": [{"begin", "schema", "end"}],
"triggers": [...]}` (vLLM's `structured_outputs.structural_tag` and SGLang's `sampling_params.structural_tag` as
that object's JSON text). The output is any text until it writes a trigger; the structure whose `begin` starts with
that trigger then has to be written out: the rest of `begin`, a JSON value of its schema, `end`; then free text
again, and more calls. This module checks a spec's shape (no grammar engine needed: the frontend's check) and
writes the Lark grammar of llguidance for it. xgrammar's newer form (`"format": {...}`) is not taken.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sfllm.sampling_params import InvalidSamplingParams


def structural_tag_definition(value: Any, field: str) -> str:
    """The spec as sfllm keeps it (JSON text: each structure with the trigger that opens it), from the object or
    its JSON text; InvalidSamplingParams naming `field` for one of the wrong shape."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidSamplingParams(field, f"{field}: the structural tag is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidSamplingParams(field, f"{field}: a structural tag is an object with structures and triggers")
    if "format" in value:
        raise InvalidSamplingParams(field, f"{field}: the structural tag's format form (xgrammar's) is not supported "
                                           "by sfllm; send structures and triggers")
    triggers, structures = value.get("triggers"), value.get("structures")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise InvalidSamplingParams(field, f"{field}: a structural tag's triggers must be a non-empty list of "
                                           "non-empty strings")
    if not isinstance(structures, list) or not structures:
        raise InvalidSamplingParams(field, f"{field}: a structural tag's structures must be a non-empty list of "
                                           "objects with begin, schema and end")
    kept = []
    for index, structure in enumerate(structures):
        where = f"{field}: the structural tag's structures[{index}]"
        if not isinstance(structure, dict):
            raise InvalidSamplingParams(field, f"{where} must be an object with begin, schema and end")
        begin, end, schema = structure.get("begin"), structure.get("end"), structure.get("schema")
        if not isinstance(begin, str) or not isinstance(end, str):
            raise InvalidSamplingParams(field, f"{where}: begin and end must be strings")
        if schema is not None and not isinstance(schema, dict):
            raise InvalidSamplingParams(field, f"{where}: schema must be a JSON schema object")
        trigger = next((t for t in triggers if begin.startswith(t)), None)  # the first, as vLLM picks it
        if trigger is None:
            raise InvalidSamplingParams(field, f"{where}: begin {begin!r} starts with none of the triggers "
                                               f"{triggers!r}")
        kept.append({"trigger": trigger, "begin": begin, "schema": schema or {}, "end": end})
    return json.dumps({"structures": kept})


def structural_tag_lark(definition: str, json_body: Callable[[dict[str, Any]], str],
                        special_token: Callable[[str], int | None]) -> str:
    """llguidance's Lark grammar of `definition` (structural_tag_definition's text). `json_body(schema)` is the
    JSON schema to inline for a structure's value; `special_token(trigger)` the id of the model's special token that
    the trigger names, or None where the trigger is text. A special token is never text to the grammar engine: a
    trigger such as Llama 3.1's `<|python_tag|>` must be matched as the token, or the model could not write it."""
    structures = json.loads(definition)["structures"]
    rules = []
    for index, structure in enumerate(structures):
        trigger, begin = structure["trigger"], structure["begin"]
        body = " ".join(part for part in (_literal(begin[len(trigger):]), f"%json{json_body(structure['schema'])}",
                                          _literal(structure["end"])) if part)
        token = special_token(trigger)
        if token is not None:
            rules.append(f"tag_{index}: TEXT <[{token}]> {body}")
        else:  # lazy: the text ends at the trigger's first occurrence, which starts the structure
            rules.append(f"tag_{index}_trigger[lazy]: TEXT {_literal(trigger)}")
            rules.append(f"tag_{index}: tag_{index}_trigger {body}")
    tags = " | ".join(f"tag_{index}" for index in range(len(structures)))
    return "\n".join(["%llguidance {}", f"start: ({tags})* TEXT", r"TEXT: /(.|\n)*/", *rules]) + "\n"


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""
