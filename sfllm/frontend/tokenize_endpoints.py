"""POST /tokenize and /detokenize, as vLLM serves them: the model's tokenizer and chat template over HTTP, for
clients that count or check tokens before they send a request. No engine work: the frontend answers alone."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from sfllm.frontend.chat_completions import chat_prompt
from sfllm.frontend.engine_client import EngineClient
from sfllm.frontend.errors import InvalidRequestError
from sfllm.frontend.openai_protocol import ChatCompletionRequest, ChatMessage, TokenId
from sfllm.frontend.request_checks import check_model, check_unicode
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.frontend.tool_protocol import ChatTool, StrictModel
from sfllm.frontend.tools import ChatTools


class TokenizeRequest(StrictModel):
    """A prompt, or chat messages rendered as /v1/chat/completions renders them (with its template options)."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[ChatTool] | None = None
    add_special_tokens: bool | None = Field(default=None, description="the tokenizer's BOS and such (default true "
                                                                      "for a prompt; false for messages, whose "
                                                                      "template writes its own)")
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = Field(default=None, description="not supported, as on the chat endpoint")
    return_token_strs: bool | None = False


class TokenizeResponse(StrictModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(StrictModel):
    prompt: str


class TokenizeEndpoints:
    def __init__(self, served_model_name: str, tokenizer: Tokenizer, engine: EngineClient) -> None:
        self.served_model_name = served_model_name
        self.tokenizer = tokenizer
        self.engine = engine  # its context length, as its latest hello says (none needed to tokenize)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model, self.served_model_name)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give either prompt or messages", param="prompt")
        if body.chat_template is not None:
            raise InvalidRequestError("chat_template is not supported by this server", param="chat_template")
        if body.messages is None:
            check_unicode([body.prompt], "prompt")
            tokens = await self.tokenizer.encode_async(body.prompt, body.add_special_tokens is not False)
        else:  # as /v1/chat/completions renders them
            chat = ChatCompletionRequest(
                messages=body.messages, tools=body.tools, add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message, chat_template_kwargs=body.chat_template_kwargs,
                add_special_tokens=body.add_special_tokens, documents=body.documents)
            tokens = await chat_prompt(self.tokenizer, chat, ChatTools(chat))
        strings = self.tokenizer.vocabulary_strings(tokens) if body.return_token_strs else None
        hello = self.engine.hello
        return TokenizeResponse(count=len(tokens), max_model_len=hello.max_context_length if hello else None,
                                tokens=tokens, token_strs=strings)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model, self.served_model_name)
        unknown = next((t for t in body.tokens if t >= self.tokenizer.num_known_tokens), None)
        if unknown is not None:
            raise InvalidRequestError(f"tokens holds {unknown}, which the tokenizer does not know (it knows "
                                      f"[0, {self.tokenizer.num_known_tokens}))", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens, skip_special_tokens=False))
