"""Per-request sampling and stopping settings, shared by every process."""
from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import msgspec

from sfllm.bad_words import bad_words_token_ids

MAX_LOGIT_BIAS = 100.0


def token_outside_vocabulary(token_ids: Iterable[int], vocab_size: int) -> int | None:
    """The first id not in [0, vocab_size), or None."""
    if isinstance(token_ids, list) and token_ids and min(token_ids) >= 0 and max(token_ids) < vocab_size:
        return None  # in C: a long prompt costs microseconds
    return next((t for t in token_ids if not 0 <= t < vocab_size), None)


class InvalidSamplingParams(ValueError):
    """A sampling value is out of range; `param` names the offending field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ThoughtTokens(msgspec.Struct, frozen=True):
    """The tokens that open and close a thinking model's thought, which comes before the constrained answer.
    `opened`: the prompt opened the thought (the output starts in it); otherwise the output may open one with its
    first token, or start the answer at once."""
    start: int
    end: int
    opened: bool = False


class StructuredOutput(msgspec.Struct, frozen=True):
    """What the output's text must match: a JSON schema, a regular expression, a grammar in Lark or GBNF
    (llama.cpp's EBNF), or structural tags (free text with schema-bound calls, sfllm/structural_tag.py);
    sfllm/structured_output.py turns it into the grammar engine's form."""
    kind: Literal["json_schema", "regex", "grammar", "structural_tag"]
    definition: str
    # with a reasoning parser: the grammar applies to the text after the thought, as vLLM applies it
    after_thought: ThoughtTokens | None = None

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> StructuredOutput:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> StructuredOutput:
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, grammar: str) -> StructuredOutput:
        return cls("grammar", grammar)

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        """The output is exactly one of `choices`: one regular expression (a Lark alternation of literals holds at
        most 2,000 in llguidance)."""
        return cls.regex("|".join(regex_literal(choice) for choice in dict.fromkeys(choices)))

    @classmethod
    def structural_tag(cls, spec: dict[str, Any] | str, field: str = "response_format") -> StructuredOutput:
        """`{"structures": [{"begin", "schema", "end"}], "triggers": [...]}` or xgrammar's `{"format": {...}}`
        (sfllm/structural_tag.py), or its JSON text; InvalidSamplingParams naming `field` for one of the wrong
        shape."""
        from sfllm.structural_tag import structural_tag_definition  # it raises this module's error
        return cls("structural_tag", structural_tag_definition(spec, field))


# the characters a regular expression of llguidance (Rust's regex syntax) reads as syntax
_REGEX_SYNTAX = frozenset("\\.+*?()|[]{}^$#&-~")


def regex_literal(text: str) -> str:
    """`text` as a regular expression that matches it alone."""
    return "".join("\\" + char if char in _REGEX_SYNTAX else char for char in text)


def constraint_of(kind: str, value: Any, field: str) -> StructuredOutput:
    """A constraint as vLLM's and SGLang's fields give it: `kind` json (a schema, or its JSON text), choice (strings),
    regex, grammar or structural_tag (the object or its JSON text); InvalidSamplingParams naming `field` for a value
    of the wrong shape."""
    if kind == "json":
        if isinstance(value, (str, dict)):  # a string is the schema's JSON text, as SGLang's json_schema always is
            return StructuredOutput.json_schema(value)
        raise InvalidSamplingParams(field, f"{field}: a JSON schema is an object or its JSON text")
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(choice, str) for choice in value):
            raise InvalidSamplingParams(field, f"{field}: the choices are a non-empty list of strings")
        return StructuredOutput.choice(value)
    if kind == "structural_tag":
        return StructuredOutput.structural_tag(value, field)
    if not isinstance(value, str):
        raise InvalidSamplingParams(field, f"{field} must be a string")
    return StructuredOutput.regex(value) if kind == "regex" else StructuredOutput.grammar(value)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's constraint (0.11 and later), offline as `SamplingParams(structured_outputs=StructuredOutputsParams(
    json=schema))` and over HTTP as the `structured_outputs` object: one of json, regex, choice, grammar,
    structural_tag (its JSON text) and json_object (as in vLLM a field is set unless None). The options that only
    tune vLLM's grammar backend have no effect here (JSON comes on one line anyway; properties a schema does not
    list are never written unless it allows them); those that would change the output and that sfllm lacks are
    refused."""
    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None  # refused
    structural_tag: str | dict[str, Any] | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("json", "regex", "choice", "grammar", "structural_tag")

    def __post_init__(self) -> None:
        self.constraints()  # a malformed or empty one is refused where it is made, as vLLM refuses it

    def constraints(self) -> list[StructuredOutput]:
        """Each constraint set; InvalidSamplingParams("structured_outputs") for a malformed or unsupported one, or
        for none."""
        field = "structured_outputs"
        constraints = [constraint_of(kind, getattr(self, kind), field) for kind in self.KINDS
                       if getattr(self, kind) is not None]
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise InvalidSamplingParams(field, "structured_outputs.json_object must be true or false")
        if self.json_object:
            constraints.append(StructuredOutput.json_object())
        if self.whitespace_pattern not in (None, ""):
            raise InvalidSamplingParams(field, "structured_outputs.whitespace_pattern is not supported by sfllm")
        if not constraints:
            raise InvalidSamplingParams(field, "structured_outputs sets no constraint; give one of "
                                               f"{', '.join([*self.KINDS, 'json_object'])}")
        return constraints

    def constraint(self) -> StructuredOutput:
        """The one constraint set (offline: a request has one)."""
        constraints = self.constraints()
        if len(constraints) > 1:
            raise InvalidSamplingParams("structured_outputs", "structured_outputs sets more than one constraint; a "
                                                              "request has one")
        return constraints[0]


MIN_TEMPERATURE = 0.01  # a positive temperature below it is taken as this


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int = 16
    # the output's first min_tokens tokens are never EOS (even with ignore_eos, as vLLM masks it) nor a
    # stop_token_id, and no stop string ends in their text
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    # logprobs of the prompt's tokens (each given the ones before it) with this many alternatives
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    structured_output: StructuredOutput | None = None
    # vLLM's spelling of the constraint: read into structured_output when the params are made, then None
    structured_outputs: StructuredOutputsParams | None = None
    # added to the logits of these token ids before sampling
    logit_bias: dict[int, float] = {}
    # the only token ids the output may hold (vLLM's), None: any
    allowed_token_ids: list[int] | None = None
    # words the output may not contain (vLLM's), and the token sequences they ban, which the side holding the
    # tokenizer fills in (sfllm.bad_words): the engine reads those only
    bad_words: list[str] = []
    bad_words_token_ids: list[list[int]] = []

    def __post_init__(self) -> None:
        # vLLM's spellings, which code written for it passes: None for "none", one stop string, True for one
        # logprob, top_k 0 for off
        if isinstance(self.stop, str):  # one stop string, as vLLM takes it (not a list of its characters)
            self.stop = [self.stop]
        for name, empty in (("stop", []), ("stop_token_ids", []), ("bad_words", []), ("logit_bias", {})):
            if getattr(self, name) is None:
                setattr(self, name, type(empty)())
        for name in ("logprobs", "prompt_logprobs"):
            if isinstance(getattr(self, name), bool):
                setattr(self, name, 1 if getattr(self, name) else None)
        if self.top_k == 0:
            self.top_k = -1
        if self.structured_outputs is not None:
            if self.structured_output is not None:
                raise InvalidSamplingParams("structured_outputs", "give structured_output or structured_outputs "
                                                                  "(vLLM's spelling), not both")
            self.structured_output, self.structured_outputs = self.structured_outputs.constraint(), None
        # Below 0.01 the logits over the temperature overflow (1e-38 drew token 0 over and over): vLLM raises such a
        # temperature to 0.01 too.
        if isinstance(self.temperature, float) and 0.0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def constrained(self) -> bool:
        return self.structured_output is not None

    @property
    def reads_output_tokens(self) -> bool:
        """Whether drawing a token reads the output so far: penalties, or a bad word of several tokens."""
        # read for every row of every step the worker resolves: the empty list answers without a generator
        return self.has_penalties or (bool(self.bad_words_token_ids)
                                      and any(len(sequence) > 1 for sequence in self.bad_words_token_ids))

    def with_bad_words_tokenized(self, encode: Callable[[str], list[int]]) -> SamplingParams:
        """These settings with bad_words_token_ids from bad_words (`encode`: text -> ids, no special tokens)."""
        if not self.bad_words:
            return self
        if isinstance(self.bad_words, str) or not all(isinstance(word, str) for word in self.bad_words):
            raise InvalidSamplingParams("bad_words", "bad_words must be a list of strings")
        return msgspec.structs.replace(self, bad_words_token_ids=bad_words_token_ids(self.bad_words, encode))

    def validate(self, max_logprobs: int = 20, vocab_size: int | None = None) -> None:
        # the offline API builds these without msgspec's type checks: a wrong type is named, not a TypeError
        for name in ("max_tokens", "min_tokens", "top_k", "n", "seed"):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise InvalidSamplingParams(name, f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise InvalidSamplingParams(name, f"{name} must be a number, got {value!r}")
        checks = [
            ("max_tokens", self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            ("temperature", 0.0 <= self.temperature <= 2.0,
             f"temperature must be in [0, 2], got {self.temperature}"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (off) or >= 1, got {self.top_k}"),
            ("top_p", 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            ("min_p", 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0,
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            ("n", 1 <= self.n <= 128, f"n must be in [1, 128], got {self.n}"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= max_logprobs,
             f"logprobs must be in [0, {max_logprobs}], got {self.logprobs}"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            ("stop", self.detokenize or not self.stop, "stop strings need the text: they cannot be combined with "
                                                       "detokenize=False (stop_token_ids can)"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens ({self.max_tokens})], got {self.min_tokens}"),
            ("min_tokens", not (self.min_tokens and self.structured_output is not None),
             "min_tokens cannot be combined with a structured output (or a forced tool call): its grammar decides "
             "where the output may end"),
            # any int64, as vLLM takes it (plan_choices wraps it into the worker's range)
            ("seed", self.seed is None or -2**63 <= self.seed < 2**63,
             f"seed must be in [-2^63, 2^63), got {self.seed}"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= max_logprobs,
             f"prompt_logprobs must be in [0, {max_logprobs}], got {self.prompt_logprobs}"),
            ("logit_bias", all(-MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS for bias in self.logit_bias.values()),
             f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
            ("allowed_token_ids", self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
             "allowed_token_ids must hold at least one token id"),
            ("allowed_token_ids", not (self.allowed_token_ids is not None and self.structured_output is not None),
             "allowed_token_ids cannot be combined with a structured output (or a forced tool call): the grammar "
             "decides which tokens may come"),
            ("bad_words", all(word.strip() for word in self.bad_words), "bad_words must be words, not empty or blank"),
            ("bad_words", all(self.bad_words_token_ids), "bad_words_token_ids must not hold an empty sequence"),
            ("bad_words", not (self.bad_words and not self.bad_words_token_ids),
             "bad_words must be tokenized before they reach the engine (SamplingParams.with_bad_words_tokenized)"),
            ("bad_words", not ((self.bad_words or self.bad_words_token_ids) and self.structured_output is not None),
             "bad_words cannot be combined with a structured output (or a forced tool call): the grammar decides "
             "which tokens may come"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidSamplingParams(param, message)
        if self.allowed_token_ids is not None:
            always_banned = {sequence[0] for sequence in self.bad_words_token_ids if len(sequence) == 1}
            if always_banned.issuperset(self.allowed_token_ids):
                raise InvalidSamplingParams("allowed_token_ids", "every token of allowed_token_ids is one of the "
                                                                 "bad_words: nothing is left to draw")
        if vocab_size is not None:
            self.check_vocabulary(vocab_size)
        if self.structured_output is not None:
            from sfllm.structured_output import grammar_of  # llguidance: only where grammars are used
            grammar_of(self.structured_output)

    def check_vocabulary(self, vocab_size: int) -> None:
        # the sampler indexes the logits with stop ids (masked before min_tokens), bias ids, banned and allowed ids
        banned = [t for sequence in self.bad_words_token_ids for t in sequence]
        token_ids = (("stop_token_ids", "stop_token_ids", self.stop_token_ids),
                     ("logit_bias", "logit_bias", self.logit_bias),
                     ("bad_words", "bad_words_token_ids", banned),
                     ("allowed_token_ids", "allowed_token_ids", self.allowed_token_ids or []))
        for param, field, ids in token_ids:
            outside = token_outside_vocabulary(ids, vocab_size)
            if outside is not None:
                raise InvalidSamplingParams(param, f"{field} holds token id {outside}, outside the vocabulary "
                                                   f"[0, {vocab_size})")
