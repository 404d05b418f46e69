"""OpenAI's /v1/completions and /v1/chat/completions bodies, and their SamplingParams.

Requests validate strictly (a string is not a number, "yes" is not a boolean);
unknown fields are ignored, as clients send OpenAI options sfllm has no use for, except those
that would change the answer and that sfllm does not implement (`UNSUPPORTED`): a 400 names them.
Every optional field also accepts null. Ranges are checked by `SamplingParams.validate`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from sfllm.frontend.other_server_constraints import other_server_constraints
from sfllm.frontend.tool_protocol import ChatTool, ChatToolCall, StrictModel, ToolChoice
from sfllm.messages import Priority, SamplingDefaults
from sfllm.sampling_params import InvalidSamplingParams, SamplingParams, StructuredOutput
from sfllm.structured_output import InvalidGrammar

MAX_LOGPROBS = 20
NO_DEFAULTS = SamplingDefaults()  # sfllm's own for every field a request leaves out
# Integers the engine stores in int32/int64 tensors; a larger one is no meaningful value.
MAX_TOKEN_INT = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_INT)]
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
# sfllm's class, or vLLM's integer (int64, as vLLM bounds it; sfllm.messages.priority_class reads it)
RequestPriority = Priority | Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# a logit_bias key: a token id in ASCII digits (str.isdigit also takes "²", and int() refuses 4301 digits)
_TOKEN_ID_KEY = re.compile(r"\s*-?[0-9]{1,18}\s*")


class RequestBody(StrictModel):
    # unknown fields are kept (and not checked) so that `check_supported` can see them
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(StrictModel):
    # unknown options are kept: any option at all, known or not, needs `stream`, as vLLM checks it
    model_config = ConfigDict(strict=True, extra="allow")
    # false when left out, as OpenAI and vLLM read it (vLLM defaulted to true before its PR #36379)
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = Field(default=False, description="vLLM's: with include_usage, the usage "
                                                                           "so far in every chunk too")


class JsonSchemaFormat(StrictModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    # the output always follows the schema: grammars do not approximate it, strict or not
    strict: bool | None = None


class ResponseFormat(StrictModel):
    """OpenAI's text, json_object and json_schema; the extensions regex and grammar (Lark or GBNF); vLLM's and
    SGLang's structural_tag (structures and triggers, or xgrammar's format; checked by sfllm/structural_tag.py)."""
    type: Literal["text", "json_object", "json_schema", "regex", "grammar", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    regex: str | None = None
    grammar: str | None = None
    structures: list[Any] | None = None
    triggers: list[Any] | None = None
    format: Any = None  # xgrammar's form of a structural tag

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput.json_object()
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise InvalidSamplingParams("response_format", "response_format of type json_schema needs "
                                                               "json_schema.schema")
            return StructuredOutput.json_schema(self.json_schema.schema_)
        if self.type == "structural_tag":
            return StructuredOutput.structural_tag(self.model_dump(include={"structures", "triggers", "format"},
                                                                   exclude_unset=True), "response_format")
        text = self.regex if self.type == "regex" else self.grammar
        if text is None:
            raise InvalidSamplingParams("response_format", f"response_format of type {self.type} needs {self.type}")
        return StructuredOutput(self.type, text)


class GenerationRequest(RequestBody):
    """What both endpoints share: model, sampling, stopping, streaming, priority, structured outputs."""
    model: str | None = None
    max_tokens: int | None = None
    max_new_tokens: int | None = Field(default=None, description="alias of max_tokens")
    min_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKEN_INT,
                                   description="vLLM's: no end (EOS, stop_token_ids, stop strings) before this many")
    min_new_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKEN_INT, description="alias of min_tokens")
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, le=MAX_TOKEN_INT,
                                               description="vLLM's: keep the prompt's last k tokens (-1: the context)")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(default=None, le=MAX_TOKEN_INT)
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    n: int | None = None
    best_of: int | None = Field(default=None, description="vLLM's: samples drawn to return the n best; only n")
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    allowed_token_ids: list[TokenId] | None = Field(default=None, description="vLLM's: the only tokens the output "
                                                                             "may hold")
    bad_words: list[str] | None = Field(default=None, description="vLLM's: words the output may not contain")
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: RequestPriority | None = Field(default=None, description="scheduling class, or vLLM's integer (below 0 "
                                                                       "high, 0 normal, above 0 background); also "
                                                                       "the X-Priority header")
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    prompt_logprobs: int | None = Field(default=None, description="extension: logprobs of the prompt's tokens, with "
                                                                  "this many alternatives")
    return_token_ids: bool | None = Field(default=False, description="vLLM's: the prompt's and the output's token ids "
                                                                     "in the answer (prompt_token_ids, token_ids)")
    return_tokens_as_token_ids: bool | None = Field(default=False, description="vLLM's: logprobs name their "
                                                                               "tokens \"token_id:<id>\"")
    request_id: str | None = Field(default=None, description="vLLM's: names the answer (the X-Request-Id header "
                                                             "wins)")
    cache_salt: str | None = Field(default=None, min_length=1, description="vLLM's: only requests of the same salt "
                                                                           "share cached prompt prefixes")
    _requested_constraint: Any = PrivateAttr(default=None)
    _constraint_known: bool = PrivateAttr(default=False)
    # OpenAI fields that change the answer and that sfllm does not implement: set, they are a 400
    UNSUPPORTED: ClassVar[tuple[str, ...]] = ()
    # vLLM's and SGLang's options that change the answer and that sfllm does not implement
    OTHER_SERVERS_OPTIONS: ClassVar[tuple[str, ...]] = (
        "use_beam_search",  # vLLM
        "no_stop_trim")  # SGLang

    def check_supported(self) -> None:
        extra = self.model_extra or {}
        for name in self.UNSUPPORTED + self.OTHER_SERVERS_OPTIONS:
            if extra.get(name) not in (None, False, "", [], {}):
                raise InvalidSamplingParams(name, f"{name} is not supported by this server")
        n = _or(self.n, 1)
        if self.best_of is not None and self.best_of < n:
            raise InvalidSamplingParams("best_of", f"best_of must be at least n ({n}), got {self.best_of}")
        if self.best_of is not None and self.best_of > n:
            raise InvalidSamplingParams("best_of", f"best_of ({self.best_of}) greater than n is not supported by this "
                                                   "server: it returns every sample it draws")

    def requested_structured_output(self) -> tuple[str, StructuredOutput] | None:
        """The output's constraint and the field it came in: response_format, or one of vLLM's and SGLang's own
        fields (sfllm/frontend/other_server_constraints.py); more than one is a 400. Worked out once a request (a
        schema's grammar text is a JSON dump of it)."""
        if not self._constraint_known:
            self._requested_constraint = self._structured_output_fields()
            self._constraint_known = True
        return self._requested_constraint

    def _structured_output_fields(self) -> tuple[str, StructuredOutput] | None:
        given = other_server_constraints(self.model_extra or {})
        if self.response_format is not None and self.response_format.type != "text":
            given.insert(0, ("response_format", self.response_format.structured_output()))
        if len(given) > 1:
            first, second = given[0][0], given[1][0]
            both = f"{first} sets two constraints" if first == second else f"{first} and {second} both set one"
            raise InvalidSamplingParams(second, f"{both} on the output; send one")
        return given[0] if given else None

    def max_tokens_field(self) -> str:
        """The field the token budget is read from (the first set of those the endpoint takes), for the errors
        that name it."""
        return "max_new_tokens" if self.max_tokens is None and self.max_new_tokens is not None else "max_tokens"

    def requested_max_tokens(self) -> int | None:
        return getattr(self, self.max_tokens_field())

    def truncated(self, prompt: list[int], max_context_length: int) -> list[int]:
        """The prompt's last `truncate_prompt_tokens` tokens (-1: as many as the context holds), as vLLM cuts it."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return prompt
        if keep == 0:
            raise InvalidSamplingParams("truncate_prompt_tokens", "truncate_prompt_tokens must be at least 1, or -1 "
                                                                  "for the context's worth")
        if keep > max_context_length:
            raise InvalidSamplingParams("truncate_prompt_tokens", f"truncate_prompt_tokens ({keep}) is more than the "
                                                                  f"model's context ({max_context_length} tokens)")
        keep = max_context_length if keep == -1 else keep
        return prompt[-keep:] if 0 < keep < len(prompt) else prompt

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def usage_in_every_chunk(self) -> bool:
        return self.include_usage_in_stream() and bool(self.stream_options.continuous_usage_stats)

    def check_stream_options(self) -> None:
        """Options without `stream` are a 400, as in vLLM; an empty `{}` is not, as vLLM lets it pass."""
        options = self.stream_options
        if options is not None and (options.model_fields_set or options.model_extra) and not self.stream:
            raise InvalidSamplingParams("stream_options", "stream_options is only allowed when stream is true")

    def token_logit_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise InvalidSamplingParams("logit_bias", f"logit_bias keys are token ids; got {key!r}")
            bias[int(key)] = value
        return bias

    def constraint_field(self) -> str | None:
        """The field the output's constraint came in (response_format, guided_json, ...), to name in an error the
        engine finds in it later."""
        requested = self.requested_structured_output()
        return requested[0] if requested else None

    def sampling_params(self, max_tokens: int, logprobs: int | None, vocab_size: int | None = None,
                        structured_output: StructuredOutput | None = None,
                        encode: Callable[[str], list[int]] | None = None,
                        defaults: SamplingDefaults = NO_DEFAULTS) -> SamplingParams:
        """The engine's settings for one sample; raises InvalidSamplingParams naming the bad field.
        `structured_output`, where given, replaces the response format's (a forced tool call's grammar);
        `encode` (text -> ids, no special tokens) tokenizes the bad words; `defaults` fill the sampling fields
        left out (the model's generation config), before sfllm's own."""
        self.check_stream_options()
        stop = self.stop_strings()
        requested = self.requested_structured_output() if structured_output is None else None
        top_k = _or(self.top_k, defaults.top_k)
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=_or(self.min_tokens, _or(self.min_new_tokens, 0)),
            temperature=_or(self.temperature, _or(defaults.temperature, 1.0)),
            top_p=_or(self.top_p, _or(defaults.top_p, 1.0)),
            top_k=-1 if top_k in (None, 0) else top_k,  # 0 means off to many clients
            min_p=_or(self.min_p, _or(defaults.min_p, 0.0)),
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, _or(defaults.repetition_penalty, 1.0)),
            seed=self.seed,
            n=_or(self.n, 1),
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=_or(self.ignore_eos, False),
            include_stop_str_in_output=_or(self.include_stop_str_in_output, False),
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=_or(self.skip_special_tokens, True),
            structured_output=structured_output or (requested and requested[1]),
            logit_bias=self.token_logit_bias(),
            allowed_token_ids=None if self.allowed_token_ids is None else list(self.allowed_token_ids),
            bad_words=list(self.bad_words or []),
        )
        if encode is not None:
            params = params.with_bad_words_tokenized(encode)
        try:
            params.validate(max_logprobs=MAX_LOGPROBS, vocab_size=vocab_size)
        except InvalidGrammar as error:  # named "response_format": the field the client used instead
            raise InvalidGrammar(requested[0] if requested else error.param, str(error)) from None
        return params


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    echo: bool | None = False
    logprobs: int | None = None
    # vLLM's: false leaves out the BOS and such that the tokenizer puts around a text prompt, for a client that
    # rendered its chat template itself (token id prompts are taken as they are)
    add_special_tokens: bool | None = True
    UNSUPPORTED = ("suffix",)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, value: Any, handler: Any) -> Prompt:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids "
                             "or a list of lists of token ids") from None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        # validated as one of the Prompt shapes: the first item tells which list it is
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class ChatTextPart(StrictModel):
    type: Literal["text"]
    text: str

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported: the models served here read "
                             "text only (parts of type 'text')")
        return value


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatTextPart] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None
    # an earlier answer's thought, as a reasoning parser gave it: for the template. `reasoning` is current vLLM's
    # name of the same field (clients send either)
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.reasoning_content is None:
            self.reasoning_content = self.reasoning
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message of role tool needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages have tool_calls, not {self.role} messages")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return joined_text(self.content)
        return self.content or ""


def joined_text(parts: list[ChatTextPart]) -> str:
    """A message's text parts as one text, as the server and LLM.chat give it to the template."""
    return "\n".join(part.text for part in parts)


# the values OpenAI's API takes (which a model honours is the model's: a template reads the variable or not)
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's options of the chat template (ChatTemplate.render); unset, add_generation_prompt is true unless
    # continue_final_message is
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = Field(default=None, description="more variables for the chat "
                                                                                  "template, e.g. enable_thinking")
    # OpenAI's; as vLLM, the template's `reasoning_effort` variable (a template that reads none ignores it)
    reasoning_effort: ReasoningEffort | None = None
    # vLLM's: with a reasoning parser, false leaves the reasoning out of the answer (it is still generated)
    include_reasoning: bool | None = True
    # vLLM's: true adds the tokenizer's BOS and such to the rendered template, which already holds them (so twice)
    add_special_tokens: bool | None = False
    UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options", "chat_template")
    # vLLM's: a retrieval template's sources (e.g. {"title", "text"} each), as transformers' `documents`
    documents: list[dict[str, str]] | None = None
    # vLLM's: a last message of the assistant's (continue_final_message) is repeated before what the model adds
    echo: bool | None = False

    def template_options(self) -> dict[str, Any]:
        """add_generation_prompt, continue_final_message and the template's variables, for ChatTemplate.render."""
        continue_final = bool(self.continue_final_message)
        add_prompt = not continue_final if self.add_generation_prompt is None else self.add_generation_prompt
        variables = self.chat_template_kwargs
        if self.reasoning_effort is not None:  # the client's own variable of that name, if any, wins
            variables = {"reasoning_effort": self.reasoning_effort} | (variables or {})
        return {"add_generation_prompt": add_prompt, "continue_final_message": continue_final,
                "variables": variables, "documents": self.documents}

    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else super().max_tokens_field()

    def num_logprobs(self) -> int | None:
        """How many alternatives per token the engine must return; None for no logprobs."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidSamplingParams("top_logprobs", "top_logprobs requires logprobs to be true")
            return None
        top = _or(self.top_logprobs, 0)
        if not 0 <= top <= MAX_LOGPROBS:
            raise InvalidSamplingParams("top_logprobs", f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}")
        return top
