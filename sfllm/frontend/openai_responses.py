"""OpenAI's answers to /v1/completions and /v1/chat/completions, whole and streamed, and /v1/models'
cards: what the frontend writes back (the requests are openai_protocol's)."""
from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, model_serializer

from sfllm.frontend.tool_protocol import ChatToolCall, ToolCallChunk


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class PromptTokenLogprob(BaseModel):
    """vLLM's layout of a prompt logprob: keyed by token id, the prompt's own token and the top alternatives."""
    logprob: float
    rank: int | None  # 1: the likeliest token
    decoded_token: str


PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]  # per prompt token; None for the first


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or `stop_token_ids` token that ended it
    prompt_logprobs: PromptLogprobs | None = None
    # vLLM's return_token_ids: the prompt's ids (a stream's first chunk of the choice) and the generated ones
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None

    @model_serializer(mode="wrap")
    def _without_extension_if_unset(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), ("prompt_logprobs", "prompt_token_ids", "token_ids"))


def _without_none(fields: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if not (key in names and value is None)}


def _with_reasoning_alias(fields: dict[str, Any]) -> dict[str, Any]:
    """The thought under both names clients read: `reasoning_content` (DeepSeek's, SGLang's, the AI SDK's) and
    `reasoning` (current vLLM's, OpenRouter's)."""
    if fields.get("reasoning_content") is not None:
        fields["reasoning"] = fields["reasoning_content"]
    return fields


class CompletionResponse(BaseModel):
    """A whole completion, and also the shape of each streamed chunk."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # with a reasoning parser (sfllm/frontend/reasoning_parser.py)
    tool_calls: list[ChatToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler: Any) -> dict[str, Any]:
        return _with_reasoning_alias(_without_none(handler(self), ("tool_calls", "reasoning_content")))


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or `stop_token_ids` token that ended it
    prompt_logprobs: PromptLogprobs | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids: the generated ids, before any parsing

    @model_serializer(mode="wrap")
    def _without_extension_if_unset(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), ("prompt_logprobs", "token_ids"))


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids

    @model_serializer(mode="wrap")
    def _without_extension_if_unset(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), ("prompt_token_ids",))


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallChunk] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_fields(self, handler: Any) -> dict[str, Any]:
        # A delta carries only what changed: `{"content": "x"}`, and `{}` with the finish reason.
        return _with_reasoning_alias({key: value for key, value in handler(self).items() if value is not None})


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    token_ids: list[int] | None = None  # vLLM's return_token_ids: the ids this chunk adds

    @model_serializer(mode="wrap")
    def _without_extension_if_unset(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), ("prompt_logprobs", "token_ids"))


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # vLLM's return_token_ids: in a choice's first (role) chunk

    @model_serializer(mode="wrap")
    def _without_extension_if_unset(self, handler: Any) -> dict[str, Any]:
        return _without_none(handler(self), ("prompt_token_ids",))


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sfllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
