"""Structural tags: free text in which each tool call, once the model starts one, follows its schema.

vLLM and SGLang take them as `response_format: {"type": "structural_tag", ...}` (vLLM's
`structured_outputs.structural_tag` and SGLang's `sampling_params.structural_tag` as that object's JSON text), in
two forms:

- `structures` and `triggers` (the first form, which vLLM's and SGLang's llguidance backends take): the output is
  any text until it writes a trigger; the structure whose `begin` starts with that trigger (the shortest trigger
  its begin starts with: vLLM takes the first listed, which with a trigger the prefix of another opens the wrong
  structure) then has to be written out: the rest of `begin`, a JSON value of its schema, `end`; then free text
  again, and more calls.
- `format` (xgrammar's): a tree of formats, `const_string`, `json_schema`, `regex`, `grammar`, `any_text`,
  `sequence`, `or`, `tag`, `triggered_tags`, `tags_with_separator`, `optional`, `plus`, `star`, `repeat`, read as
  xgrammar reads them. Not taken (a 400 naming it): the token formats, `dispatch`, a JSON schema's `style` other
  than `json` and `any_order`, `any_text`'s token and character limits. Text that can be anything (`any_text`, the
  text around triggered tags) must end the output or be followed by a fixed string (the enclosing tag's end, a
  `const_string`): it stops at that string's first occurrence; and anywhere in a tag it never holds the tag's end,
  as xgrammar keeps it out.

This module checks a spec's shape (no grammar engine needed: the frontend's check) and keeps it as one `format`
tree (the first form as the `triggered_tags` it means), then writes the Lark grammar of llguidance for it.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sfllm.sampling_params import InvalidSamplingParams, regex_literal

MAX_DEPTH = 32  # formats nested deeper are refused, before any recursion could run out of stack
_NOT_TAKEN = ("qwen_xml_parameter", "dispatch", "token", "exclude_token", "any_tokens", "token_triggered_tags",
              "token_dispatch")


def structural_tag_definition(value: Any, field: str) -> str:
    """The spec as sfllm keeps it (JSON text of its `format` tree, each triggered tag with the trigger that opens
    it), from the object or its JSON text; InvalidSamplingParams naming `field` for one of the wrong shape."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as error:
            raise InvalidSamplingParams(field, f"{field}: the structural tag is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidSamplingParams(field, f"{field}: a structural tag is an object with a format, or with "
                                           "structures and triggers")
    try:
        return json.dumps({"format": _checked(value, field)})
    except RecursionError:  # a schema inside nested past what Python encodes
        raise InvalidSamplingParams(field, f"{field}: the structural tag is nested too deep") from None


def _checked(value: dict[str, Any], field: str) -> dict[str, Any]:
    """The spec's format tree, its defaults filled in."""
    if value.get("format") is not None:
        return _Checker(field).format(value["format"], "format", 0)
    triggers, structures = value.get("triggers"), value.get("structures")
    checker = _Checker(field)
    checker.strings(triggers, "triggers", non_empty_items=True)
    if not isinstance(structures, list) or not structures:
        raise InvalidSamplingParams(field, f"{field}: a structural tag's structures must be a non-empty list of "
                                           "objects with begin, schema and end")
    tags = []
    for index, structure in enumerate(structures):
        where = f"structures[{index}]"
        if not isinstance(structure, dict):
            checker.fail(f"{where} must be an object with begin, schema and end")
        begin, end, schema = structure.get("begin"), structure.get("end"), structure.get("schema")
        if not isinstance(begin, str) or not isinstance(end, str):
            checker.fail(f"{where}: begin and end must be strings")
        if schema is not None and not isinstance(schema, dict):
            checker.fail(f"{where}: schema must be a JSON schema object")
        # the shortest trigger it starts with: a longer one's text holds the shorter, which opens the tag first
        trigger = min((t for t in triggers if begin.startswith(t)), key=len, default=None)
        if trigger is None:
            checker.fail(f"{where}: begin {begin!r} starts with none of the triggers {triggers!r}")
        tags.append({"type": "tag", "begin": begin, "trigger": trigger, "end": [end],
                     "content": {"type": "json_schema", "json_schema": schema or {}}})
    return {"type": "triggered_tags", "tags": tags, "excludes": [], "at_least_one": False, "stop_after_first": False}


class _Checker:
    """Checks a `format` tree and returns it with its defaults filled in and unknown keys left out."""

    def __init__(self, field: str) -> None:
        self.field = field

    def fail(self, message: str) -> None:
        raise InvalidSamplingParams(self.field, f"{self.field}: the structural tag's {message}")

    def strings(self, value: Any, where: str, non_empty_items: bool = False, non_empty: bool = True) -> list[str]:
        if not isinstance(value, list) or (non_empty and not value) or \
                not all(isinstance(item, str) and (item or not non_empty_items) for item in value):
            self.fail(f"{where} must be a {'non-empty ' if non_empty else ''}list of "
                      f"{'non-empty ' if non_empty_items else ''}strings")
        return value

    def flag(self, node: dict[str, Any], key: str, where: str) -> bool:
        value = node.get(key, False)
        if not isinstance(value, bool):
            self.fail(f"{where}.{key} must be true or false")
        return value

    def format(self, node: Any, where: str, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            self.fail(f"{where} is nested more than {MAX_DEPTH} formats deep")
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            self.fail(f"{where} must be an object with a type")
        kind = node["type"]
        if kind in _NOT_TAKEN:
            self.fail(f"{where}: format {kind!r} is not supported by sfllm")
        if kind not in _FORMATS:
            self.fail(f"{where}: unknown format type {kind!r}")
        return {"type": kind, **getattr(self, f"_{kind}")(node, where, depth + 1)}

    def _const_string(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        if not isinstance(node.get("value"), str):
            self.fail(f"{where}.value must be a string")
        return {"value": node["value"]}

    def _json_schema(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        schema = node.get("json_schema")
        if not isinstance(schema, dict) and schema is not True:
            self.fail(f"{where}.json_schema must be a JSON schema object")
        if node.get("style", "json") != "json":
            self.fail(f"{where}: style {node['style']!r} is not supported by sfllm (json only)")
        if node.get("any_order"):
            self.fail(f"{where}: any_order is not supported by sfllm (properties come in the schema's order)")
        return {"json_schema": {} if schema is True else schema}

    def _regex(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        if not isinstance(node.get("pattern"), str) or not node["pattern"]:
            self.fail(f"{where}.pattern must be a non-empty string")
        return {"pattern": node["pattern"]}

    def _grammar(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        if not isinstance(node.get("grammar"), str) or not node["grammar"].strip():
            self.fail(f"{where}.grammar must be a non-empty string")
        return {"grammar": node["grammar"]}

    def _any_text(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        for limit in ("max_tokens", "max_chars"):
            if node.get(limit) is not None:
                self.fail(f"{where}: {limit} is not supported by sfllm")
        return {"excludes": self.strings(node.get("excludes", []), f"{where}.excludes", True, False)}

    def _sequence(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        return {"elements": self.formats(node.get("elements"), f"{where}.elements", depth)}

    _or = _sequence

    def formats(self, nodes: Any, where: str, depth: int) -> list[dict[str, Any]]:
        if not isinstance(nodes, list) or not nodes:
            self.fail(f"{where} must be a non-empty list of formats")
        return [self.format(item, f"{where}[{index}]", depth) for index, item in enumerate(nodes)]

    def _tag(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        end = node.get("end")
        if not isinstance(node.get("begin"), str):
            self.fail(f"{where}.begin must be a string (token begins are not supported by sfllm)")
        if not isinstance(end, (str, list)):
            self.fail(f"{where}.end must be a string or a list of strings")
        ends = [end] if isinstance(end, str) else self.strings(end, f"{where}.end")
        content = self.format(node.get("content"), f"{where}.content", depth)
        if content["type"] == "any_text" and not any(ends):
            self.fail(f"{where}: a tag whose content is any text needs a non-empty end")
        return {"begin": node["begin"], "content": content, "end": ends}

    def tags(self, node: dict[str, Any], where: str, depth: int) -> list[dict[str, Any]]:
        tags = node.get("tags")
        if not isinstance(tags, list) or not tags:
            self.fail(f"{where}.tags must be a non-empty list of tags")
        return [{"type": "tag", **self._tag(tag if isinstance(tag, dict) else {}, f"{where}.tags[{index}]", depth)}
                for index, tag in enumerate(tags)]

    def _triggered_tags(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        triggers = self.strings(node.get("triggers"), f"{where}.triggers", non_empty_items=True)
        tags = self.tags(node, where, depth)
        for index, tag in enumerate(tags):
            matching = [trigger for trigger in triggers if tag["begin"].startswith(trigger)]
            if len(matching) != 1:  # as xgrammar: a tag begins with exactly one trigger
                self.fail(f"{where}.tags[{index}]: begin {tag['begin']!r} starts with "
                          f"{'none' if not matching else 'more than one'} of the triggers {triggers!r}")
            tag["trigger"] = matching[0]
        return {"tags": tags, "excludes": self.strings(node.get("excludes", []), f"{where}.excludes", True, False),
                "at_least_one": self.flag(node, "at_least_one", where),
                "stop_after_first": self.flag(node, "stop_after_first", where)}

    def _tags_with_separator(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        if not isinstance(node.get("separator"), str):
            self.fail(f"{where}.separator must be a string")
        return {"tags": self.tags(node, where, depth), "separator": node["separator"],
                "at_least_one": self.flag(node, "at_least_one", where),
                "stop_after_first": self.flag(node, "stop_after_first", where)}

    def _optional(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        return {"content": self.format(node.get("content"), f"{where}.content", depth)}

    _plus = _star = _optional

    def _repeat(self, node: dict[str, Any], where: str, depth: int) -> dict[str, Any]:
        low, high = node.get("min"), node.get("max")
        if not _is_int(low) or not _is_int(high) or low < 0 or (high != -1 and high < low):
            self.fail(f"{where}: min must be an integer of at least 0 and max -1 (no bound) or at least min")
        return {"min": low, "max": high, **self._optional(node, where, depth)}


# the format types taken, each checked by _Checker's method of its name
_FORMATS = frozenset({"const_string", "json_schema", "regex", "grammar", "any_text", "sequence", "or", "tag",
                      "triggered_tags", "tags_with_separator", "optional", "plus", "star", "repeat"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StructuralTagLark:
    """llguidance's grammar of a kept spec (structural_tag_definition's text). `json_body(schema)`: the JSON schema
    to inline for a `%json` value; `to_lark(grammar)`: a `grammar` format's text (Lark or GBNF) as Lark;
    `special_token(text)`: the id of the model's special token that a trigger, begin, end or constant string names,
    or None where it is text. A special token is never text to the grammar engine: a trigger such as Llama 3.1's
    `<|python_tag|>`, or an end such as its `<|eom_id|>`, must be matched as the token, or the model could not
    write it.

    `emit(format, follow)` writes a format's expression followed by `follow`, the fixed strings that may come right
    after it (one of them; None: the output ends there; []: something that is not a fixed string). Text that can be
    anything stops at the first of them, so a format that holds such text at its end takes the strings in."""

    def __init__(self, json_body: Callable[[dict[str, Any]], str], to_lark: Callable[[str], str],
                 special_token: Callable[[str], int | None]) -> None:
        self.json_body, self.to_lark, self.special_token = json_body, to_lark, special_token
        self.rules: list[str] = []
        self.side_grammars: list[dict[str, str]] = []
        self.within: list[str] = []  # the ends of the tag being written

    def grammar(self, definition: str) -> str:
        start = self.emit(json.loads(definition)["format"], None)
        lark = "\n".join(["%llguidance {}", f"start: {start}", *self.rules]) + "\n"
        if not self.side_grammars:
            return lark
        return json.dumps({"grammars": [{"name": "structural_tag", "lark_grammar": lark}, *self.side_grammars]})

    def rule(self, body: str, lazy: bool = False, terminal: bool = False) -> str:
        name = f"{'T' if terminal else 'r'}{len(self.rules)}"
        self.rules.append(f"{name}{'[lazy]' if lazy else ''}: {body}")
        return name

    def emit(self, node: dict[str, Any], follow: list[str] | None) -> str:
        kind = node["type"]
        if kind == "any_text":
            return self.text_until(node["excludes"], follow, "any_text must end the output or come before a fixed "
                                                             "string")
        if kind == "sequence":
            return self.sequence(node["elements"], follow)
        if kind == "or":
            return "(" + " | ".join(self.emit(element, follow) for element in node["elements"]) + ")"
        if kind == "tag":
            outer, self.within = self.within, [end for end in node["end"] if end]
            content = self.emit(node["content"], node["end"])
            self.within = outer
            return _join(self.literal(node["begin"]), content, self.one_of(follow))
        if kind == "triggered_tags":
            return self.triggered_tags(node, follow)
        if kind == "tags_with_separator":
            tag = "(" + " | ".join(self.emit(t, None) for t in node["tags"]) + ")"
            tags = tag if node["stop_after_first"] else f"{tag} ({_join(self.literal(node['separator']), tag)})*"
            return _join(tags if node["at_least_one"] else f"({tags})?", self.one_of(follow))
        if kind == "optional" and follow:  # the content with what follows it, or what follows alone
            return f"({self.emit(node['content'], follow)} | {self.one_of(follow)})"
        if kind in ("optional", "plus", "star", "repeat"):
            if node["content"]["type"] == "any_text":  # any text, repeated or not, is any text
                return self.emit(node["content"], follow)
            if kind == "repeat" and node["max"] == 0:
                return _join('""', self.one_of(follow))
            count = {"optional": "?", "plus": "+", "star": "*"}.get(kind)
            if count is None:
                count = f"{{{node['min']},{'' if node['max'] == -1 else node['max']}}}"
            return _join(f"({self.emit(node['content'], [])}){count}", self.one_of(follow))
        return _join(self.fixed(node), self.one_of(follow))

    def fixed(self, node: dict[str, Any]) -> str:
        """A format that never holds text that can be anything."""
        kind = node["type"]
        if kind == "const_string":
            return self.literal(node["value"]) or '""'
        if kind == "json_schema":
            return f"%json{self.json_body(node['json_schema'])}"
        if kind == "regex":
            return "/" + _slashes_escaped(node["pattern"]) + "/"
        name = f"g{len(self.side_grammars)}"
        self.side_grammars.append({"name": name, "lark_grammar": self.to_lark(node["grammar"])})
        return f"@{name}"

    def sequence(self, elements: list[dict[str, Any]], follow: list[str] | None) -> str:
        """Each element followed by the next; an element before a constant string writes that string too."""
        elements = [e for e in elements if e["type"] != "const_string" or e["value"]] or elements[:1]
        parts, index = [], 0
        while index < len(elements):
            following = elements[index + 1] if index + 1 < len(elements) else None
            if following is None:
                parts.append(self.emit(elements[index], follow))
            elif following["type"] == "const_string":
                parts.append(self.emit(elements[index], [following["value"]]))
                index += 1
                if index == len(elements) - 1:  # that string was the last: then what follows the sequence
                    parts.append(self.one_of(follow))
            else:
                parts.append(self.emit(elements[index], []))
            index += 1
        return _join(*parts)

    def literal(self, text: str) -> str:
        """`text` as the grammar matches it: the model's special token where `text` names one (never text to the
        grammar engine), else the text."""
        token = self.special_token(text) if text else None
        return _literal(text) if token is None else f"<[{token}]>"

    def one_of(self, strings: list[str] | None) -> str:
        literals = list(dict.fromkeys(self.literal(s) or '""' for s in strings or []))
        return literals[0] if len(literals) == 1 else "(" + " | ".join(literals) + ")" if literals else ""

    def free_text(self, stops: list[str]) -> str:
        """A terminal of any text that holds none of `stops`, nor the end of the tag it is in (as xgrammar keeps
        text out of its enclosing tag's end wherever in the tag it is)."""
        stops = [*stops, *self.within]
        pattern = r"/(.|\n)*/"
        if any(stops):
            pattern += r" & ~/(.|\n)*(" + "|".join(_slashes_escaped(regex_literal(s)) for s in stops if s) + \
                r")(.|\n)*/"
        return self.rule(pattern, terminal=True)

    def text_until(self, excludes: list[str], follow: list[str] | None, misplaced: str) -> str:
        """Text without `excludes`, then one of `follow` at its first occurrence (or the output's end)."""
        text = self.free_text([*excludes, *(follow or [])])
        if follow is None:
            return text
        if not any(follow):
            raise ValueError(f"the structural tag's {misplaced}")
        tokens = [s for s in follow if s and self.literal(s).startswith("<[")]
        written = [s for s in follow if s and s not in tokens]
        # a written stop ends the text lazily, at its first occurrence; a special token is never in the text
        ends = [self.rule(f"{text} {_one_of(written)}", lazy=True)] if written else []
        ends += [_join(text, self.one_of(tokens))] if tokens else []
        ends += [text] if "" in follow else []  # an empty end: the text may stop anywhere
        return ends[0] if len(ends) == 1 else "(" + " | ".join(ends) + ")"

    def triggered_tags(self, node: dict[str, Any], follow: list[str] | None) -> str:
        """Free text in which each trigger opens its tag; with at_least_one the text opens with a tag, with
        stop_after_first it ends with its first tag (as xgrammar reads them: both, one tag alone)."""
        text = self.free_text([*node["excludes"], *(follow or [])])
        opened, bare = [], []  # each tag after its free text; and alone, where no text may come first
        for tag in node["tags"]:
            rest = _join(self.literal(tag["begin"][len(tag["trigger"]):]), self.emit(tag["content"], tag["end"]))
            trigger = self.literal(tag["trigger"])
            if not trigger.startswith("<["):  # lazy: the text ends at the trigger's first occurrence: the tag's start
                opened.append(_join(self.rule(f"{text} {trigger}", lazy=True), rest))
            else:
                opened.append(_join(text, trigger, rest))
            bare.append(_join(trigger, rest))
        first = "(" + " | ".join(bare if node["at_least_one"] else opened) + ")"
        if node["stop_after_first"] and node["at_least_one"]:
            return _join(first, self.one_of(follow))
        tail = self.text_until(node["excludes"], follow, "triggered_tags must end the output or come before a "
                                                         "fixed string")
        if node["stop_after_first"]:  # text with no trigger, or text up to the one tag
            return f"({_join(first, self.one_of(follow))} | {tail})"
        return _join(first if node["at_least_one"] else "", "(" + " | ".join(opened) + ")*", tail)


def structural_tag_lark(definition: str, json_body: Callable[[dict[str, Any]], str], to_lark: Callable[[str], str],
                        special_token: Callable[[str], int | None]) -> str:
    """llguidance's grammar (Lark, or a list of grammars where a `grammar` format is nested) of `definition`."""
    return StructuralTagLark(json_body, to_lark, special_token).grammar(definition)


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""


def _one_of(texts: list[str]) -> str:
    """One of non-empty texts, as text (a lazy rule's end: no special token may be in it)."""
    literals = list(dict.fromkeys(_literal(text) for text in texts))
    return literals[0] if len(literals) == 1 else "(" + " | ".join(literals) + ")"


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _slashes_escaped(pattern: str) -> str:
    """A regular expression inside Lark's /.../: each unescaped slash escaped."""
    out, escaped = [], False
    for char in pattern:
        out.append("\\/" if char == "/" and not escaped else char)
        escaped = char == "\\" and not escaped
    return "".join(out)
