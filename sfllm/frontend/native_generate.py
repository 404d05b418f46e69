"""SGLang's native `POST /generate`, over the completions endpoint's generation, as SGLang's clients (RL
rollouts, the frontend language's `select()`, scoring) call it: `text` or `input_ids` (one prompt or a batch),
`sampling_params` in SGLang's names, `return_logprob` with `top_logprobs_num`, `logprob_start_len` and
`return_text_in_logprobs`, `stream`, `priority` (as /v1/completions reads it: lower runs earlier).

An answer is SGLang's: `text`, `output_ids` and `meta_info` (`id`, `finish_reason` as `{"type": "stop",
"matched": <token id or stop string>}` or `{"type": "length", "length": <max_new_tokens>}`, `prompt_tokens`,
`completion_tokens`, `cached_tokens`, `e2e_latency`); one object for one prompt and one sample, else a list (prompt
by prompt, each prompt's samples in turn; with `sampling_seed`, sample i draws with seed + i, as on /v1/completions).
With `return_logprob`, `input_token_logprobs` and `output_token_logprobs` hold a `[logprob, token_id, text]` per
token (text null unless `return_text_in_logprobs`), and with `top_logprobs_num` > 0 `input_top_logprobs` and
`output_top_logprobs` such lists per token. The input ones cover the prompt from `logprob_start_len` on (-1, the
default: its last token alone), the first entry's logprob and top list null, as SGLang scores them; a start past
the prompt's last token is a 400. `max_new_tokens` 0 scores the prompt alone: no output tokens, `completion_tokens`
0, `{"type": "length", "length": 0}` (the engine samples one token, which the answer leaves out). Streamed, each
event holds a choice's text, ids and logprobs so far (SGLang's default), with its `index`, then `data: [DONE]`.
Per-prompt `sampling_params` lists, images, embeddings and LoRA are a 400. As in SGLang, a stop token's text (EOS or
one of `stop_token_ids`) is left out of `text` unless `no_stop_trim`; its id ends `output_ids`. A structured output
ends when its grammar does: `matched` is null then (SGLang samples EOS after it).
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, ValidationError

from sfllm.frontend.choice_events import choice_events
from sfllm.frontend.choices import ChoiceDelta
from sfllm.frontend.completions import CompletionEndpoint
from sfllm.frontend.errors import InvalidRequestError
from sfllm.frontend.http_responses import EventStreamResponse, sse_event, start_event_stream, until_disconnect
from sfllm.frontend.logprobs_format import SGLangLogprob, sglang_logprobs, sglang_prompt_logprobs
from sfllm.frontend.openai_protocol import MAX_LOGPROBS, CompletionRequest, RequestPriority
from sfllm.frontend.request_checks import check_unicode
from sfllm.frontend.tool_protocol import StrictModel

# SGLang's sampling params, by the completions field each is (None: the same name)
_SAMPLING_FIELDS: dict[str, str | None] = {
    "max_new_tokens": None, "min_new_tokens": None, "sampling_seed": "seed",
    "no_stop_trim": "include_stop_str_in_output", "stop": None, "stop_token_ids": None, "temperature": None,
    "top_p": None, "top_k": None, "min_p": None, "frequency_penalty": None, "presence_penalty": None,
    "repetition_penalty": None, "ignore_eos": None, "skip_special_tokens": None, "n": None, "logit_bias": None,
    "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None}
# SGLang's params with no effect on the answer here: its fast tokenizers put no space between special tokens either,
# and every event is sent as it comes
_NO_EFFECT = ("spaces_between_special_tokens", "stream_interval")
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's, clipped to the room the context leaves
_UNSUPPORTED = ("image_data", "audio_data", "video_data", "input_embeds", "lora_path", "return_hidden_states",
                "custom_logit_processor")


class NativeGenerateRequest(StrictModel):
    model_config = ConfigDict(strict=True, extra="allow")
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool | None = False
    return_logprob: bool | None = False
    top_logprobs_num: int | None = None
    logprob_start_len: int | None = None
    return_text_in_logprobs: bool | None = False
    rid: str | None = None
    # as on /v1/completions: lower runs earlier, as in vLLM and in SGLang with --schedule-low-priority-values-first
    priority: RequestPriority | None = None

    def is_batch(self) -> bool:
        prompt = self.text if self.text is not None else self.input_ids
        return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)

    def completion_request(self) -> CompletionRequest:
        extra = self.model_extra or {}
        for name in _UNSUPPORTED:
            if extra.get(name) not in (None, False):
                raise InvalidRequestError(f"{name} is not supported by this server", param=name)
        if (self.text is None) == (self.input_ids is None):
            raise InvalidRequestError("give one of text and input_ids", param="text")
        if self.logprob_start_len is not None and self.logprob_start_len < -1:
            raise InvalidRequestError(f"logprob_start_len is {self.logprob_start_len}; it is a prompt position "
                                      "(0 or more) or -1 (the last prompt token)", param="logprob_start_len")
        check_unicode([self.rid or ""], "rid")
        sampling = {name: value for name, value in (self.sampling_params or {}).items() if name not in _NO_EFFECT}
        unknown = sorted(set(sampling) - set(_SAMPLING_FIELDS))
        if unknown:
            raise InvalidRequestError(f"sampling_params {unknown} are not supported; these are: "
                                      f"{', '.join(_SAMPLING_FIELDS)}", param="sampling_params")
        body: dict[str, Any] = {_SAMPLING_FIELDS[name] or name: value for name, value in sampling.items()
                                if value is not None}
        body["prompt"] = self.text if self.text is not None else self.input_ids
        body["stream"] = bool(self.stream)
        body["priority"] = self.priority
        if self.return_logprob:
            body["logprobs"] = self.top_logprobs_num or 0
            if self.logprob_start_len is not None and self.logprob_start_len >= 0:
                body["prompt_logprobs"] = self.top_logprobs_num or 0
        try:
            return CompletionRequest.model_validate(body)
        except ValidationError as error:  # named as the client sent it
            first = error.errors()[0]
            field = str(first.get("loc", ("sampling_params",))[0])
            sglang = next((name for name, same in _SAMPLING_FIELDS.items() if (same or name) == field), field)
            raise InvalidRequestError(f"sampling_params.{sglang}: {first.get('msg', 'invalid value')}",
                                      param=f"sampling_params.{sglang}") from None

    def logprob_start(self, num_prompt_tokens: int) -> int:
        """The prompt position `input_token_logprobs` begin at: by default (-1) the last token's, as in SGLang."""
        start = self.logprob_start_len
        if start is None or start == -1:
            return num_prompt_tokens - 1
        if start >= num_prompt_tokens:
            raise InvalidRequestError(f"logprob_start_len is {start}, past a prompt whose last token is at position "
                                      f"{num_prompt_tokens - 1}: it must be at most that (or -1, that token alone)",
                                      param="logprob_start_len")
        return start


class AbortRequestBody(StrictModel):
    """SGLang's `POST /abort_request`: one request by its `rid` (a batch's, or one answer's `meta_info.id`), or
    every request this frontend runs (`abort_all`, as RL rollouts end a round)."""
    rid: str = ""
    abort_all: bool = False


class NativeGenerateEndpoint:
    def __init__(self, completions: CompletionEndpoint) -> None:
        self.completions = completions
        self.running: dict[str, list[str]] = {}  # an answer's or a batch's rid: its engine requests' ids

    def abort(self, body: AbortRequestBody) -> JSONResponse:
        """Ends the requests named (their answers finish with `{"type": "abort"}`); 200 whether or not any ran,
        as SGLang answers."""
        engine = self.completions.engine
        if body.abort_all:
            count = engine.abort_running()
        else:
            count = engine.abort_running(self.running.get(body.rid, []))
        return JSONResponse({"aborted": count})

    async def _tracked(self, names: dict[str, list[str]],
                       deltas: AsyncGenerator[ChoiceDelta, None]) -> AsyncGenerator[ChoiceDelta, None]:
        """`deltas`, their requests abortable by `names` meanwhile."""
        for name, ids in names.items():
            self.running[name] = ids
        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    yield delta
        finally:
            for name in names:
                self.running.pop(name, None)

    async def __call__(self, body: NativeGenerateRequest, request: Request) -> JSONResponse | EventStreamResponse:
        completion_body = body.completion_request()
        arrival = time.time()
        if body.return_logprob and (body.top_logprobs_num or 0) > MAX_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs_num is at most {MAX_LOGPROBS}", param="top_logprobs_num")
        completion = await self.completions.start(completion_body, request, "generate-", DEFAULT_MAX_NEW_TOKENS,
                                                  zero_max_tokens_scores_prompt=True)
        if body.return_logprob:  # before the deltas are read: a bad start reaches no engine
            for prompt in completion.prompt_token_ids:
                body.logprob_start(len(prompt))
        rid = body.rid or completion.request_id  # the client's id, as SGLang answers it; the engine's stays unique
        token_text = self.completions.tokenizer.token_decoded if body.return_text_in_logprobs else None
        answers = [_Answer(f"{rid}-{index}" if len(completion.texts) > 1 else rid, body, arrival, token_text)
                   for index in range(len(completion.texts))]
        ids = completion.engine_request_ids
        deltas = self._tracked({rid: ids} | {answer.rid: [ids[index]] for index, answer in enumerate(answers)},
                               completion.deltas)
        if body.stream:
            def events_of(delta: ChoiceDelta) -> list[str]:
                answers[delta.index].add(delta)
                return [sse_event(json.dumps({**answers[delta.index].json(), "index": delta.index},
                                             ensure_ascii=False))]
            events = choice_events(deltas, events_of, None, completion.outcome)
            return await start_event_stream(request, events, completion.high_priority_trace)
        await until_disconnect(request, self._complete(deltas, answers))
        whole = [answer.json() for answer in answers]
        return JSONResponse(whole if body.is_batch() or len(whole) > 1 else whole[0])

    @staticmethod
    async def _complete(deltas: AsyncGenerator[ChoiceDelta, None], answers: list[_Answer]) -> None:
        async with aclosing(deltas):
            async for delta in deltas:
                answers[delta.index].add(delta)


class _Answer:
    """One choice's text, ids and meta_info as its deltas build them."""

    def __init__(self, rid: str, body: NativeGenerateRequest, arrival: float,
                 token_text: Callable[[int], str] | None) -> None:
        self.rid = rid
        self.logprob_start = body.logprob_start
        self.logprobs = bool(body.return_logprob)
        self.top = body.top_logprobs_num or 0
        self.token_text = token_text
        self.arrival = arrival
        self.text = ""
        self.output_ids: list[int] = []
        self.input_token_logprobs: list[SGLangLogprob] | None = None  # from the choice's first delta on
        self.input_top_logprobs: list[list[SGLangLogprob] | None] = []
        self.token_logprobs: list[SGLangLogprob] = []
        self.top_logprobs: list[list[SGLangLogprob]] = []
        self.finish_reason: dict[str, Any] | None = None
        self.prompt_tokens = self.cached_tokens = 0

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.output_ids += delta.token_ids
        self.prompt_tokens, self.cached_tokens = delta.num_prompt_tokens, delta.num_cached_tokens
        if self.logprobs and self.input_token_logprobs is None:  # the first delta holds the prompt's logprobs
            start = self.logprob_start(len(delta.prompt_token_ids))
            self.input_token_logprobs, self.input_top_logprobs = sglang_prompt_logprobs(
                delta.prompt_token_ids, delta.prompt_logprobs or [], start, self.top, self.token_text)
        if self.logprobs and delta.logprobs is not None:
            entries, tops = sglang_logprobs(delta.token_ids, delta.logprobs, self.top, self.token_text)
            self.token_logprobs += entries
            self.top_logprobs += tops
        if delta.finish_reason == "length":
            self.finish_reason = {"type": "length", "length": len(self.output_ids)}  # the token budget, reached
        elif delta.finish_reason == "abort":
            self.finish_reason = {"type": "abort", "message": "the request was aborted"}
        elif delta.finish_reason is not None:
            self.finish_reason = {"type": delta.finish_reason, "matched": delta.matched_stop}

    def json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"id": self.rid, "finish_reason": self.finish_reason,
                                "prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.output_ids),
                                "cached_tokens": self.cached_tokens, "e2e_latency": time.time() - self.arrival}
        if self.logprobs:
            meta["input_token_logprobs"] = self.input_token_logprobs or []
            meta["output_token_logprobs"] = self.token_logprobs
            if self.top:  # as SGLang: no top lists without top_logprobs_num
                meta["input_top_logprobs"] = self.input_top_logprobs
                meta["output_top_logprobs"] = self.top_logprobs
        return {"text": self.text, "output_ids": self.output_ids, "meta_info": meta}
