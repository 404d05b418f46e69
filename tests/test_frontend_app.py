"""The HTTP API over a scripted in-process engine: shapes, streaming, errors, aborts."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

import sfllm
from sfllm.config import ConfigError, FrontendConfig, ServerConfig
from sfllm.frontend.app import create_app
from sfllm.frontend.engine_client import EngineRequestError, EngineUnavailableError
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.messages import (PROTOCOL_VERSION, EngineHello, EngineStats, GenerateRequest, RequestOutput,
                            SampledLogprobs, SamplingDefaults, TokenizerSpec, TokenLogprob)
from sfllm.sampling_params import StructuredOutput

MODEL = "smollm2-135m-instruct"
SCRIPT = "The quick brown fox jumps over the lazy dog. 你好"


# The app is handed its Tokenizer; the hello's spec is what the frontend's server builds one from.
UNREAD_TOKENIZER_SPEC = TokenizerSpec(tokenizer_json="", chat_template=None, special_tokens={}, vocab_size=0)


class ScriptedEngine:
    """Stands in for EngineClient: every request generates `script`'s tokens, one per output."""

    address = "scripted://engine"

    def __init__(self, tokenizer: Tokenizer, max_context_length: int = 128, delay_s: float = 0.0,
                 error: EngineRequestError | EngineUnavailableError | None = None, script: str = SCRIPT,
                 sampling_defaults: SamplingDefaults = SamplingDefaults()) -> None:
        self.hello = EngineHello(protocol_version=PROTOCOL_VERSION, model_name=MODEL,
                                 max_context_length=max_context_length, eos_token_ids=[2], num_kv_blocks=8,
                                 block_size=16, tokenizer=UNREAD_TOKENIZER_SPEC, sampling_defaults=sampling_defaults)
        self.connected = True
        self.healthy = True
        self.stats = EngineStats(running={"normal": 1}, waiting={}, num_kv_blocks=8, num_free_kv_blocks=5,
                                 num_cached_kv_blocks=1, prefix_cache_queries=0, prefix_cache_hits=0,
                                 num_preemptions=0, num_steps=3, step_time_s=0.01, batch_size=1,
                                 gpu_memory_allocated=0, gpu_memory_reserved=0, ready=True)
        self.num_in_flight = 0
        self.delay_s = delay_s
        self.error = error
        self.script = tokenizer.encode(script)
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.in_flight: set[str] = set()
        self.ended: dict[str, Exception] = {}

    async def submit(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        finished = False
        self.in_flight.add(request.request_id)
        try:
            for step in range(request.params.max_tokens):
                await asyncio.sleep(self.delay_s)
                if request.request_id in self.ended:
                    finished = True  # end_streams aborted it
                    raise self.ended[request.request_id]
                token_id = self.script[step % len(self.script)]
                logprobs = None
                if request.params.logprobs is not None:
                    top = [TokenLogprob(token_id=token_id, logprob=-0.25), TokenLogprob(token_id=0, logprob=-3.0)]
                    logprobs = [SampledLogprobs(logprob=-0.25, top=top[:request.params.logprobs])]
                finished = step == request.params.max_tokens - 1
                prompt_logprobs = None
                if step == 0 and request.params.prompt_logprobs is not None:  # prompt token i's logprob: -i
                    prompt_logprobs = [SampledLogprobs(logprob=-float(i), top=[TokenLogprob(token_id=0, logprob=-5.0)])
                                       for i in range(1, len(request.prompt_token_ids))]
                yield RequestOutput(request_id=request.request_id, token_ids=[token_id], logprobs=logprobs,
                                    prompt_logprobs=prompt_logprobs, finish_reason="length" if finished else None,
                                    num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=2)
        finally:
            self.in_flight.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)

    def abort(self, request_ids: list[str]) -> None:
        self.aborted.extend(request_ids)

    def end_streams(self, error: Exception) -> int:
        self.ended.update((request_id, error) for request_id in self.in_flight)
        self.abort(list(self.in_flight))
        return len(self.in_flight)


@pytest.fixture
def engine(tokenizer: Tokenizer) -> ScriptedEngine:
    return ScriptedEngine(tokenizer)


def post(engine: ScriptedEngine, tokenizer: Tokenizer, path: str, body: Any, config: FrontendConfig | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    app = create_app(config or ServerConfig().frontend(), engine, tokenizer)  # type: ignore[arg-type]

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            return await client.post(path, content=content,
                                     headers={"content-type": "application/json", **(headers or {})})

    return asyncio.run(send())


def get(engine: ScriptedEngine, tokenizer: Tokenizer, path: str,
        config: FrontendConfig | None = None) -> httpx.Response:
    app = create_app(config or ServerConfig().frontend(), engine, tokenizer)  # type: ignore[arg-type]

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(path)

    return asyncio.run(send())


def sse_payloads(response: httpx.Response) -> list[Any]:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events[:-1])
    return [json.loads(event[len("data: "):]) for event in events[:-2]]


def script_text(tokenizer: Tokenizer, engine: ScriptedEngine, num_tokens: int) -> str:
    return tokenizer.decode(engine.script[:num_tokens])


def test_completion(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    response = post(engine, tokenizer, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"] == [{"index": 0, "text": script_text(tokenizer, engine, 5), "logprobs": None,
                                "finish_reason": "length", "stop_reason": None}]
    prompt_tokens = len(tokenizer.encode("Hello"))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                             "total_tokens": prompt_tokens + 5, "prompt_tokens_details": {"cached_tokens": 2}}
    assert engine.requests[0].request_id == body["id"] + "-0"
    assert engine.requests[0].prompt_token_ids == tokenizer.encode("Hello")


def test_default_max_tokens_is_16_for_completions_and_the_rest_of_the_context_for_chat(
        engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    post(engine, tokenizer, "/v1/completions", {"prompt": "Hello"})
    post(engine, tokenizer, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})
    chat_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert engine.requests[0].params.max_tokens == 16
    assert engine.requests[1].params.max_tokens == 128 - len(chat_prompt)


def test_n_and_prompt_lists_fan_out(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    body = post(engine, tokenizer, "/v1/completions",
                {"prompt": ["a", "b"], "n": 2, "seed": 10, "max_tokens": 2}).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2, 3]
    assert sorted(r.request_id for r in engine.requests) == [f"{body['id']}-{i}" for i in range(4)]
    by_id = {r.request_id: r for r in engine.requests}
    assert [by_id[f"{body['id']}-{i}"].params.seed for i in range(4)] == [10, 11, 10, 11]
    assert [by_id[f"{body['id']}-{i}"].prompt_token_ids for i in range(4)] == [tokenizer.encode("a")] * 2 + [
        tokenizer.encode("b")] * 2
    assert all(r.params.n == 1 for r in engine.requests)
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("a")) + len(tokenizer.encode("b"))


def test_a_negative_seed_is_any_int64_wrapped_into_the_workers_range(engine: ScriptedEngine,
                                                                   tokenizer: Tokenizer) -> None:
    """vLLM takes any int64 seed; the worker draws with seeds in [0, 2^63), so a negative one goes as s + 2^63: the
    same seed twice sends the same seed, distinct ones distinct ones, and choice i still draws with the seed + i."""
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", chat)):
        for seed in (-1, -1, -2, -2**63):
            response = post(engine, tokenizer, path, body | {"max_tokens": 1, "seed": seed})
            assert response.status_code == 200, response.text
    assert [r.params.seed for r in engine.requests] == [2**63 - 1, 2**63 - 1, 2**63 - 2, 0] * 2
    post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 1, "seed": -2, "n": 3})
    assert sorted(r.params.seed for r in engine.requests[-3:]) == [0, 2**63 - 2, 2**63 - 1]
    sent = len(engine.requests)
    for seed in (-2**63 - 1, 2**63):
        response = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "seed": seed})
        assert response.status_code == 400 and response.json()["error"]["param"] == "seed", response.text
    assert len(engine.requests) == sent


def test_token_id_prompts_and_echo(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    prompt_ids = tokenizer.encode("Echo me")
    body = post(engine, tokenizer, "/v1/completions", {"prompt": prompt_ids, "max_tokens": 3, "echo": True}).json()
    assert body["choices"][0]["text"] == "Echo me" + script_text(tokenizer, engine, 3)
    assert engine.requests[0].prompt_token_ids == prompt_ids


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_and_max_tokens_0_scores_the_prompt_alone(engine: ScriptedEngine, tokenizer: Tokenizer,
                                                                     stream: bool) -> None:
    """lm-eval's loglikelihood request: the prompt's logprobs, and no generated token in text, logprobs or usage."""
    prompt = "Score this prompt"
    prompt_ids = tokenizer.encode(prompt)
    response = post(engine, tokenizer, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True,
                                                           "logprobs": 1, "stream": stream,
                                                           **({"stream_options": {"include_usage": True}}
                                                              if stream else {})})
    assert response.status_code == 200, response.text
    if stream:
        payloads = sse_payloads(response)
        choices = [choice for payload in payloads for choice in payload["choices"]]
        text = "".join(choice["text"] for choice in choices)
        logprobs = [choice["logprobs"] for choice in choices if choice["logprobs"] is not None]
        assert len(logprobs) == 1
        logprobs, finish_reason, usage = logprobs[0], choices[-1]["finish_reason"], payloads[-1]["usage"]
    else:
        body = response.json()
        choice = body["choices"][0]
        text, logprobs, finish_reason = choice["text"], choice["logprobs"], choice["finish_reason"]
        usage = body["usage"]
    assert text == prompt
    assert logprobs["tokens"] == [tokenizer.token_text(token) for token in prompt_ids]
    assert logprobs["token_logprobs"] == [None] + [-float(i) for i in range(1, len(prompt_ids))]
    assert logprobs["text_offset"][0] == 0 and len(logprobs["text_offset"]) == len(prompt_ids)
    assert finish_reason == "length"
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == len(prompt_ids)
    assert all("prompt_logprobs" not in choice for choice in (choices if stream else [choice])), \
        "OpenAI's layout only: the prompt_logprobs extension was not asked for"


def test_prompt_logprobs_extension_asked_with_echo_comes_as_well(engine: ScriptedEngine,
                                                                  tokenizer: Tokenizer) -> None:
    body = post(engine, tokenizer, "/v1/completions", {"prompt": "Score this", "max_tokens": 1, "echo": True,
                                                       "logprobs": 1, "prompt_logprobs": 0}).json()
    choice = body["choices"][0]
    assert choice["prompt_logprobs"][0] is None
    prompt_ids = tokenizer.encode("Score this")
    assert len(choice["prompt_logprobs"]) == len(prompt_ids)
    # vLLM's layout: by token id, the prompt's own token (its logprob is -i in the script) and the top ones
    assert choice["prompt_logprobs"][1] == {
        str(prompt_ids[1]): {"logprob": -1.0, "rank": None, "decoded_token": tokenizer.token_decoded(prompt_ids[1])},
        "0": {"logprob": -5.0, "rank": 1, "decoded_token": tokenizer.token_decoded(0)}}
    assert choice["logprobs"]["token_logprobs"][0] is None


def test_max_tokens_0_without_echo_is_still_a_400(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    response = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 0})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"


def test_stop_string_ends_the_choice_and_aborts_the_engine_request(engine: ScriptedEngine,
                                                                   tokenizer: Tokenizer) -> None:
    body = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 20, "stop": ["fox"]}).json()
    assert body["choices"][0]["text"] == "The quick brown "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4
    assert engine.aborted == [engine.requests[0].request_id]


def test_chat_completion(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = post(engine, tokenizer, "/v1/chat/completions", {"messages": messages, "max_tokens": 4}).json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": script_text(
        tokenizer, engine, 4)}, "logprobs": None, "finish_reason": "length", "stop_reason": None}]
    assert engine.requests[0].prompt_token_ids == tokenizer.apply_chat_template(messages)
    assert body["usage"]["prompt_tokens"] == len(engine.requests[0].prompt_token_ids)


def test_chat_stream(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    num_tokens = len(engine.script)  # ends after a whole character
    response = post(engine, tokenizer, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": num_tokens, "stream": True,
                     "n": 2, "stream_options": {"include_usage": True}})
    chunks = sse_payloads(response)
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    for index in (0, 1):
        deltas = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(d["delta"].get("content", "") for d in deltas) == SCRIPT
        assert all("\ufffd" not in d["delta"].get("content", "") for d in deltas)
        assert [d["finish_reason"] for d in deltas][-1] == "length"
        assert all(d["finish_reason"] is None for d in deltas[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * num_tokens


def test_a_clients_x_request_id_names_the_answer_and_comes_back(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    """As vLLM: the answer's id carries the client's X-Request-Id (and the header is echoed, as with vLLM's
    --enable-request-id-headers); the engine's ids stay apart when two clients send the same one; an id of other
    characters is served under a random one."""
    trace = {"X-Request-Id": "trace-42.a:b_c"}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for path, body, answer_id in [("/v1/chat/completions", chat, "chatcmpl-trace-42.a:b_c"),
                                  ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, "cmpl-trace-42.a:b_c"),
                                  ("/v1/responses", {"input": "Hi", "max_output_tokens": 2}, "resp_trace-42.a:b_c")]:
        response = post(engine, tokenizer, path, body, headers=trace)
        assert response.status_code == 200 and response.json()["id"] == answer_id, path
        assert response.headers["x-request-id"] == "trace-42.a:b_c"
    streamed = post(engine, tokenizer, "/v1/chat/completions", chat | {"stream": True}, headers=trace)
    assert {chunk["id"] for chunk in sse_payloads(streamed)} == {"chatcmpl-trace-42.a:b_c"}
    engine_ids = [request.request_id for request in engine.requests if "trace-42" in request.request_id]
    assert len(engine_ids) == 4 and len(set(engine_ids)) == 4, engine_ids
    assert all(engine_id.startswith(("chatcmpl-trace-42.a:b_c.", "cmpl-trace-42.a:b_c.", "resp_trace-42.a:b_c."))
               for engine_id in engine_ids)
    assert "x-request-id" not in post(engine, tokenizer, "/v1/completions", {"prompt": "Hi"}).headers
    by_body = post(engine, tokenizer, "/v1/completions", {"prompt": "Hi", "request_id": "from-body"})
    assert by_body.json()["id"] == "cmpl-from-body", "vLLM's request_id field, where no header names it"
    for other in ("Zm9vYmFy+/==", "x" * 129, "two words"):  # a gateway's own format: served, under a random id
        served = post(engine, tokenizer, "/v1/completions", {"prompt": "Hi"}, headers={"X-Request-Id": other})
        assert served.status_code == 200 and served.headers["x-request-id"] == other, other
        assert other not in served.json()["id"] and served.json()["id"].startswith("cmpl-")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(engine: ScriptedEngine, tokenizer: Tokenizer,
                                                                    path: str) -> None:
    """vLLM's stream option: every chunk carries the usage so far (with include_usage; without it, none does)."""
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    body |= {"max_tokens": 6, "stream": True, "n": 2}
    options = {"include_usage": True, "continuous_usage_stats": True}
    chunks = sse_payloads(post(engine, tokenizer, path, body | {"stream_options": options}))
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert all(chunk["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"] > 0 for chunk in chunks)
    assert counts == sorted(counts) and counts[0] < counts[-1] == 12 and chunks[-1]["choices"] == []
    assert counts[0] == (1 if path == "/v1/completions" else 0), "a chat's opening role chunk counts no token yet"
    alone = sse_payloads(post(engine, tokenizer, path, body | {"stream_options": {"continuous_usage_stats": True}}))
    assert all(chunk.get("usage") is None for chunk in alone)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_empty_stream_options_ask_for_no_usage_and_need_no_stream(engine: ScriptedEngine, tokenizer: Tokenizer,
                                                                   path: str) -> None:
    """As OpenAI and vLLM (since its PR #36379) read them: `{}` leaves include_usage false, so its stream has no
    usage chunk; and `{}` without `stream` is served, where any option set, known or not, is a 400, as in vLLM."""
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    body |= {"max_tokens": 2}
    empty = sse_payloads(post(engine, tokenizer, path, body | {"stream": True, "stream_options": {}}))
    assert empty and all(chunk.get("usage") is None for chunk in empty)
    asked = sse_payloads(post(engine, tokenizer, path, body | {"stream": True,
                                                               "stream_options": {"include_usage": True}}))
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 2
    assert post(engine, tokenizer, path, body | {"stream_options": {}}).status_code == 200
    for options in ({"include_usage": False}, {"include_obfuscation": True}):
        response = post(engine, tokenizer, path, body | {"stream": False, "stream_options": options})
        assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options", options


def test_completion_stream_without_usage(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    response = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 6, "stream": True})
    chunks = sse_payloads(response)
    assert all(chunk["object"] == "text_completion" and chunk["usage"] is None for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == script_text(tokenizer, engine, 6)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completion_logprobs(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    body = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 3, "logprobs": 1}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["The", " quick", " brown"]
    assert logprobs["token_logprobs"] == [-0.25] * 3
    assert logprobs["top_logprobs"] == [{"The": -0.25}, {" quick": -0.25}, {" brown": -0.25}]
    assert logprobs["text_offset"] == [0, 3, 9]


def test_chat_logprobs(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    body = post(engine, tokenizer, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 2, "logprobs": True, "top_logprobs": 2})
    content = body.json()["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["The", " quick"]
    assert content[1]["bytes"] == list(b" quick") and content[1]["logprob"] == -0.25
    assert [top["token"] for top in content[1]["top_logprobs"]] == [" quick", "<|endoftext|>"]
    assert engine.requests[0].params.logprobs == 2


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    """vLLM's return_tokens_as_token_ids: "token_id:<id>" wherever a logprob names a token (completions' tokens and
    top_logprobs keys, an echoed prompt's too; chat's token, bytes and top_logprobs)."""
    ids = tokenizer.encode(SCRIPT, add_special_tokens=False)[:3]
    names = [f"token_id:{i}" for i in ids]
    body = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 3, "logprobs": 1,
                                                       "return_tokens_as_token_ids": True}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == names and logprobs["top_logprobs"] == [{name: -0.25} for name in names]
    assert logprobs["text_offset"] == [0, 3, 9], "offsets still count the text"
    prompt_ids = tokenizer.encode("x y")
    echoed = post(engine, tokenizer, "/v1/completions", {"prompt": "x y", "max_tokens": 1, "logprobs": 1, "echo": True,
                                                         "return_tokens_as_token_ids": True}).json()
    assert echoed["choices"][0]["logprobs"]["tokens"] == [f"token_id:{i}" for i in prompt_ids] + names[:1]
    chat = post(engine, tokenizer, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": True, "top_logprobs": 2,
        "return_tokens_as_token_ids": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == names[:2] and content[1]["bytes"] == list(names[1].encode())
    assert [top["token"] for top in content[1]["top_logprobs"]] == [names[1], "token_id:0"]


def test_priority_header(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers={"X-Priority": "background"})
    post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 1, "priority": "high"},
         headers={"X-Priority": "background"})
    assert [r.priority for r in engine.requests] == ["background", "high"]


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    ("/v1/responses", {"input": "x", "max_output_tokens": 1}),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 1}}),
])
def test_an_integer_priority_is_vllms_where_lower_runs_earlier(engine: ScriptedEngine, tokenizer: Tokenizer,
                                                               path: str, body: dict[str, Any]) -> None:
    """vLLM's integer on every endpoint that takes a priority: below 0 high, 0 normal, above 0 background, over the
    header as a class name is; a boolean, a float or a value past int64 (vLLM's bounds) is a 400."""
    for priority in (-2**63, -1, 0, 7, 2**63 - 1, "high"):
        response = post(engine, tokenizer, path, body | {"priority": priority}, headers={"X-Priority": "background"})
        assert response.status_code == 200, response.text
    assert [r.priority for r in engine.requests] == ["high", "high", "normal", "background", "background", "high"]
    for priority in (True, 1.0, 2**63, -2**63 - 1, "1"):
        response = post(engine, tokenizer, path, body | {"priority": priority})
        assert response.status_code == 400 and response.json()["error"]["param"] == "priority", response.text
    assert len(engine.requests) == 6


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/rerank", "/score", "/classify"])
def test_pooling_endpoints_are_a_404_that_says_why(engine: ScriptedEngine, tokenizer: Tokenizer, path: str) -> None:
    response = post(engine, tokenizer, path, {"model": MODEL, "input": "x"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "endpoint_not_supported" and "generative models only" in error["message"]
    assert path in error["message"] and not engine.requests


def test_health_generate_is_healthy_once_a_token_comes_back(tokenizer: Tokenizer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang's /health_generate: one greedy token of prompt [0], high priority; 503 with the reason where the
    engine refuses, is away, or generates nothing in time (its request then aborted)."""
    engine = ScriptedEngine(tokenizer)
    response = get(engine, tokenizer, "/health_generate")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    (request,) = engine.requests
    assert (request.prompt_token_ids, request.params.max_tokens, request.params.temperature, request.priority) == (
        [0], 1, 0.0, "high")
    for error in (EngineUnavailableError("the engine is away"), EngineRequestError("no room", 503)):
        response = get(ScriptedEngine(tokenizer, error=error), tokenizer, "/health_generate")
        assert response.status_code == 503 and response.json()["reason"] == str(error)
    monkeypatch.setattr("sfllm.frontend.health_generate.HEALTH_GENERATE_TIMEOUT_S", 0.05)
    stalled = ScriptedEngine(tokenizer, delay_s=5.0)
    response = get(stalled, tokenizer, "/health_generate")
    assert response.status_code == 503 and "no token within 0.05 s" in response.json()["reason"]
    assert stalled.aborted == [stalled.requests[0].request_id]


def test_cache_salt_reaches_every_choice_of_each_endpoint(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    """vLLM's cache_salt, on completions, chat and the Responses API (its request passed on to chat); an empty salt
    is a 400, as in vLLM."""
    post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 2, "cache_salt": "tenant-1"})
    post(engine, tokenizer, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 1, "cache_salt": "tenant-2"})
    post(engine, tokenizer, "/v1/responses", {"input": "Hi", "max_output_tokens": 1, "cache_salt": "tenant-3"})
    post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert [r.cache_salt for r in engine.requests] == ["tenant-1", "tenant-1", "tenant-2", "tenant-3", None]
    refused = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 1, "cache_salt": ""})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt"
    assert len(engine.requests) == 5


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_debug_log_says_when_a_high_priority_stream_got_and_wrote_its_first_token(
        engine: ScriptedEngine, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture, path: str) -> None:
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}
    with caplog.at_level(logging.DEBUG, logger="sfllm.frontend.choice_generation"):
        post(engine, tokenizer, path, body, headers={"X-Priority": "normal"})
        post(engine, tokenizer, path, body, headers={"X-Priority": "high"})
    lines = [record.getMessage() for record in caplog.records if record.name == "sfllm.frontend.choice_generation"]
    high = engine.requests[1].request_id  # the choice's id: the API request's, then "-0"
    assert [line.split(":")[0] for line in lines] == [f"high-priority request {high}",
                                                      f"high-priority request {high.rsplit('-', 1)[0]}"]
    assert "first output in the frontend at" in lines[0] and "first event written at" in lines[1]


@pytest.mark.parametrize(("body", "status", "param"), [
    (b'{"prompt": ', 400, None),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"prompt": "x", "stop": [1]}, 400, "stop[0]"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "model": "m" * 100_000}, 404, "model"),
    (b'{"prompt": "x", "model": "\\ud800"}', 400, "model"),
    (b'{"prompt": "x", "model": "ok\\udc00"}', 400, "model"),
    ({"prompt": "x", "max_tokens": 500}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "prompt"),
])
def test_client_mistakes_are_openai_errors(engine: ScriptedEngine, tokenizer: Tokenizer, body: Any, status: int,
                                           param: str | None) -> None:
    response = post(engine, tokenizer, "/v1/completions", body)
    assert response.status_code == status
    assert len(response.content) < 1000, "the answer does not echo a long value"
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and "type" in error and "code" in error
    assert engine.requests == []


def test_prompt_too_long_names_the_numbers(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "word " * 200}]
    response = post(engine, tokenizer, "/v1/chat/completions", {"messages": messages, "max_tokens": 10})
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    num_prompt_tokens = len(tokenizer.apply_chat_template(messages))
    assert f"{num_prompt_tokens} in the prompt" in error["message"] and "128" in error["message"]
    assert error["message"].endswith("the prompt or max_tokens.")
    budget = post(engine, tokenizer, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                               "max_completion_tokens": 200}).json()["error"]
    assert budget["message"].endswith("the prompt or max_completion_tokens."), "the field the client sent"


@pytest.mark.parametrize("stream", [False, True])
def test_engine_queue_full_is_503_with_retry_after(tokenizer: Tokenizer, stream: bool) -> None:
    engine = ScriptedEngine(tokenizer, error=EngineRequestError("queue full", 503))
    response = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "stream": stream})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["message"] == "queue full"


def test_engine_refusing_a_prompt_is_its_status(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, error=EngineRequestError("prompt too long: 9000 > 8192", 400))
    response = post(engine, tokenizer, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400 and "9000" in response.json()["error"]["message"]


WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather",
                                                  "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {"prompt": "x", "stream": True, "structured_outputs": {"regex": "a+"}}, "structured_outputs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": WEATHER_TOOL,
                              "tool_choice": "required"}, "tools"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ("/v1/responses", {"input": "x", "stream": True, "text": {"format": {"type": "json_object"}}}, "text.format"),
    ("/v1/completions", {"prompt": "x"}, None),  # no constraint: the engine's name stands
])
def test_an_engine_error_about_the_constraint_names_the_field_the_client_set_it_in(
        tokenizer: Tokenizer, path: str, body: dict[str, Any], param: str | None) -> None:
    """A grammar that fails only once applied is found by the engine, which names the constraint as OpenAI's
    field; the answer names the field this request used."""
    engine = ScriptedEngine(tokenizer, error=EngineRequestError(
        "the structured output's grammar failed once applied: no way to end", 400, "response_format"))
    response = post(engine, tokenizer, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == (param or "response_format") and "failed once applied" in error["message"], error


def test_engine_gone_is_503(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    engine.connected = engine.healthy = False
    response = post(engine, tokenizer, "/v1/completions", {"prompt": "x"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert get(engine, tokenizer, "/health").status_code == 503
    engine = ScriptedEngine(tokenizer, error=EngineUnavailableError("the connection closed"))
    assert post(engine, tokenizer, "/v1/completions", {"prompt": "x"}).status_code == 503


def test_health_and_models(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    health = get(engine, tokenizer, "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["running"] == {"normal": 1}
    assert (health.json()["kv_blocks_total"], health.json()["kv_blocks_free"]) == (8, 5)
    models = get(engine, tokenizer, "/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [(MODEL, "model", 128)]
    engine.hello.model_name = "my-model"  # the engine's name for its model is the API's
    assert post(engine, tokenizer, "/v1/completions", {"prompt": "x", "model": "my-model", "max_tokens": 1}
                ).status_code == 200
    assert post(engine, tokenizer, "/v1/completions", {"prompt": "x", "model": MODEL}).status_code == 404
    assert get(engine, tokenizer, "/v1/models/nope").status_code == 404
    assert get(engine, tokenizer, "/version").json() == {"version": sfllm.__version__}
    assert get(engine, tokenizer, "/get_model_info").json() == {
        "model_path": "my-model", "tokenizer_path": "my-model", "is_generation": True, "max_context_length": 128}
    engine.hello.max_running_requests, engine.hello.max_running_tokens = 24, 2048
    for path in ("/get_server_info", "/server_info"):
        assert get(engine, tokenizer, path).json() == {
            "model_path": "my-model", "tokenizer_path": "my-model", "served_model_name": "my-model",
            "context_length": 128, "page_size": 16, "max_total_num_tokens": 8 * 16, "max_running_requests": 24,
            "chunked_prefill_size": 2048, "tp_size": 1, "dp_size": 1, "disable_radix_cache": False,
            "version": sfllm.__version__}
    assert get(engine, tokenizer, "/nope").json()["error"]["type"] == "not_found_error"
    assert get(engine, tokenizer, "/openapi.json").status_code == 200


def test_api_key(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    config = ServerConfig(api_key="sekret").frontend()
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        response = post(engine, tokenizer, "/v1/completions", body, config=config, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert post(engine, tokenizer, "/v1/completions", b"{bad", config=config).status_code == 401
    assert post(engine, tokenizer, "/v1/completions", body, config=config,
                headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert get(engine, tokenizer, "/health", config=config).status_code == 200


async def call_and_disconnect(app: Any, path: str, body: dict[str, Any], disconnect_after_chunks: int | None,
                              disconnect_after_s: float | None = None) -> list[bytes]:
    """Drive the ASGI app like a server whose client leaves early."""
    left = asyncio.Event()
    sent: list[bytes] = []
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            if disconnect_after_chunks is not None and len(sent) >= disconnect_after_chunks:
                left.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    if disconnect_after_s is not None:
        asyncio.get_running_loop().call_later(disconnect_after_s, left.set)
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_leaving_a_stream_aborts_its_requests(tokenizer: Tokenizer, path: str) -> None:
    engine = ScriptedEngine(tokenizer, delay_s=0.01)
    app = create_app(ServerConfig().frontend(), engine, tokenizer)  # type: ignore[arg-type]
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 90, "stream": True, "n": 2}
    sent = asyncio.run(call_and_disconnect(app, path, body, disconnect_after_chunks=3))
    assert 3 <= len(sent) < 20
    assert sorted(engine.aborted) == sorted(r.request_id for r in engine.requests)
    assert len(engine.aborted) == 2


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 90}),
    ("/v1/responses", {"input": "x", "max_output_tokens": 90})])
def test_client_leaving_before_a_whole_answer_aborts_its_request(tokenizer: Tokenizer, path: str, body: dict[str, Any],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    engine = ScriptedEngine(tokenizer, delay_s=0.01)
    app = create_app(ServerConfig().frontend(), engine, tokenizer)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR):
        asyncio.run(call_and_disconnect(app, path, body, None, disconnect_after_s=0.1))
    assert engine.aborted == [engine.requests[0].request_id]
    assert not caplog.records, "a client gone away is no server error"


@pytest.mark.parametrize("bias", [{"²": 1}, {"1_000": 1}, {"9" * 5000: 1}, {"-3": 1}, {"5": 100.5}])
def test_logit_bias_that_is_no_token_id_or_out_of_range_is_a_400(engine: ScriptedEngine, tokenizer: Tokenizer,
                                                                  bias: dict[str, float]) -> None:
    response = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "max_tokens": 1, "logit_bias": bias})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"


def assert_offsets_index_the_text(text: str, logprobs: dict[str, Any]) -> None:
    """Each token starts at its text_offset in the text; a token of stray bytes (a piece of a character)
    at the offset of the character it ends in or the next."""
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    for token, offset in zip(logprobs["tokens"], offsets):
        if "\\x" not in token:
            assert text[offset:offset + len(token)] == token, (token, offset, text)


@pytest.mark.parametrize("stream", [False, True])
def test_text_offsets_count_characters_across_multibyte_tokens(engine: ScriptedEngine, tokenizer: Tokenizer,
                                                               stream: bool) -> None:
    """SCRIPT ends in 你好, which the byte-level vocabulary splits into pieces of characters ("\\xe4\\xbd")."""
    prompt = "你好 échoed, "
    response = post(engine, tokenizer, "/v1/completions", {"prompt": prompt, "max_tokens": len(engine.script),
                                                           "echo": True, "logprobs": 0, "stream": stream})
    if stream:
        choices = [payload["choices"][0] for payload in sse_payloads(response)]
        text = "".join(choice["text"] for choice in choices)
        logprobs = {key: [value for choice in choices if choice["logprobs"] for value in choice["logprobs"][key]]
                    for key in ("tokens", "text_offset")}
    else:
        choice = response.json()["choices"][0]
        text, logprobs = choice["text"], choice["logprobs"]
    assert text == prompt + SCRIPT
    assert len(logprobs["tokens"]) == len(tokenizer.encode(prompt)) + len(engine.script)
    assert_offsets_index_the_text(text, logprobs)


CHOICES = StructuredOutput.regex('yes|no "maybe"')
STRUCTURAL_TAG = {"structures": [{"begin": "<function=f>", "schema": {"type": "object"}, "end": "</function>"},
                                 {"begin": "<|python_tag|>", "end": ""}], "triggers": ["<function=", "<|python_tag|>"]}
TOOL_CALL_TAGS = StructuredOutput.structural_tag(STRUCTURAL_TAG)


@pytest.mark.parametrize(("path", "fields", "expected"), [
    ("/v1/chat/completions", {"guided_json": {"type": "object"}}, StructuredOutput.json_schema({"type": "object"})),
    ("/v1/completions", {"guided_json": '{"type": "object"}'}, StructuredOutput.json_schema('{"type": "object"}')),
    ("/v1/completions", {"guided_regex": "[0-9]+"}, StructuredOutput.regex("[0-9]+")),
    ("/v1/completions", {"guided_choice": ["yes", 'no "maybe"']}, CHOICES),
    ("/v1/chat/completions", {"guided_grammar": 'root ::= "a"'}, StructuredOutput.grammar('root ::= "a"')),
    ("/v1/chat/completions", {"guided_json": {"type": "object"}, "guided_decoding_backend": "xgrammar"},
     StructuredOutput.json_schema({"type": "object"})),
    ("/v1/chat/completions", {"structured_outputs": {"json": {"type": "object"}, "disable_any_whitespace": True}},
     StructuredOutput.json_schema({"type": "object"})),
    ("/v1/completions", {"structured_outputs": {"choice": ["yes", 'no "maybe"']}}, CHOICES),
    ("/v1/completions", {"structured_outputs": {"json_object": True}}, StructuredOutput.json_object()),
    ("/v1/completions", {"json_schema": '{"type": "object"}'}, StructuredOutput.json_schema('{"type": "object"}')),
    ("/v1/chat/completions", {"regex": "[0-9]+"}, StructuredOutput.regex("[0-9]+")),  # SGLang's
    ("/v1/completions", {"ebnf": 'root ::= "a"'}, StructuredOutput.grammar('root ::= "a"')),
    ("/v1/completions", {"guided_regex": None, "structured_outputs": None}, None),  # null is no request
    # as vLLM reads them: {} is a schema of any JSON value, "" a regex of the empty text
    ("/v1/completions", {"guided_json": {}}, StructuredOutput.json_schema({})),
    ("/v1/completions", {"guided_regex": ""}, StructuredOutput.regex("")),
    ("/v1/completions", {"structured_outputs": {"choice": ["a", "b"], "_backend": None, "_backend_was_auto": False}},
     StructuredOutput.regex("a|b")),  # vLLM's own fields, as a client serializing its params sends them
    # structural tags: vLLM's and SGLang's response_format, vLLM's structured_outputs and SGLang's field (JSON text)
    ("/v1/chat/completions", {"response_format": {"type": "structural_tag", **STRUCTURAL_TAG}}, TOOL_CALL_TAGS),
    ("/v1/completions", {"structured_outputs": {"structural_tag": json.dumps(STRUCTURAL_TAG)}}, TOOL_CALL_TAGS),
    ("/v1/completions", {"structural_tag": json.dumps(STRUCTURAL_TAG)}, TOOL_CALL_TAGS),
])
def test_other_servers_constraint_fields_constrain_as_response_format_does(
        engine: ScriptedEngine, tokenizer: Tokenizer, path: str, fields: dict[str, Any], expected) -> None:
    """vLLM's (guided_*, structured_outputs) and SGLang's (json_schema, regex, ebnf) fields, as their clients send
    them, reach the engine as the same constraint response_format would."""
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    response = post(engine, tokenizer, path, {**body, "max_tokens": 2, **fields})
    assert response.status_code == 200, response.text
    assert engine.requests[-1].params.structured_output == expected


@pytest.mark.parametrize(("fields", "param", "message"), [
    ({"response_format": {"type": "json_object"}, "guided_json": {"type": "object"}}, "guided_json",
     "response_format and guided_json both set"),
    ({"regex": "a", "guided_regex": "b"}, "regex", "guided_regex and regex both set one on the output"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "structured_outputs sets two constraints on the output; send one"),
    ({"structured_outputs": {"disable_fallback": True}}, "structured_outputs", "sets no constraint"),
    ({"structured_outputs": {"json": {}, "structural_tag": "{}"}}, "structured_outputs",
     "structured_outputs: the structural tag's triggers must be a non-empty list"),
    ({"structured_outputs": {"json": {}, "structural_tag": json.dumps(STRUCTURAL_TAG)}}, "structured_outputs",
     "sets two constraints"),
    ({"response_format": {"type": "structural_tag", "triggers": ["<f"], "structures": []}}, "response_format",
     "structures must be a non-empty list"),
    ({"response_format": {"type": "structural_tag", "triggers": ["<f"], "structures": [
        {"begin": "<g>", "schema": {}, "end": ""}]}}, "response_format",
     "structures[0]: begin '<g>' starts with none of the triggers ['<f']"),
    ({"response_format": {"type": "structural_tag", "triggers": ["<f"], "structures": [
        {"begin": "<f>", "schema": {"type": "nonsense"}, "end": ""}]}}, "response_format", "invalid structural tag"),
    ({"response_format": {"type": "structural_tag", "triggers": ["<f"], "structures": [{"begin": "<f>", "end": 1}]}},
     "response_format", "structures[0]: begin and end must be strings"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "dispatch", "rules": []}}}, "response_format",
     "format: format 'dispatch' is not supported by sfllm"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f", "<f="],
                                                               "tags": [{"begin": "<f=a>", "content": {
                                                                   "type": "const_string", "value": ""}, "end": ""}]}}},
     "response_format", "format.tags[0]: begin '<f=a>' starts with more than one of the triggers"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "any_text"}, {"type": "json_schema", "json_schema": {}}]}}}, "response_format",
     "any_text must end the output or come before a fixed string"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "json_schema", "json_schema": {},
                                                               "style": "qwen_xml"}}}, "response_format",
     "style 'qwen_xml' is not supported by sfllm"),
    ({"structural_tag": "{not json"}, "structural_tag", "the structural tag is not JSON"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs", "sets no constraint"),
    ({"structured_outputs": {"json_object": "false"}}, "structured_outputs", "json_object must be true or false"),
    ({"guided_choice": []}, "guided_choice", "non-empty list of strings"),
    ({"structured_outputs": "[0-9]"}, "structured_outputs", "must be an object"),
    ({"guided_choice": ["a", 1]}, "guided_choice", "non-empty list of strings"),
    ({"guided_json": 3}, "guided_json", "a JSON schema is an object"),
    ({"guided_regex": "a("}, "guided_regex", "invalid regex"),
    ({"ebnf": "root ::= ("}, "ebnf", "invalid grammar"),
    ({"guided_json": "{not json"}, "guided_json", "not JSON"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "guided_regex": "a"},
     "guided_regex", "cannot be combined with tool_choice"),
])
def test_a_malformed_or_second_constraint_is_a_400_naming_its_field(engine: ScriptedEngine, tokenizer: Tokenizer,
                                                                     fields: dict[str, Any], param: str,
                                                                     message: str) -> None:
    response = post(engine, tokenizer, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert not engine.requests


# What decides the format: a template that takes tools and asks for Llama 3's "parameters" JSON.
LLAMA3_TEMPLATE = ("{% if tools %}Respond in the format {\"name\": function name, \"parameters\": "
                   "dictionary of argument name and its value}.\n"
                   "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
                   "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_chat_documents_reach_the_template_and_must_be_strings(smollm_tokenizer_spec) -> None:
    """vLLM's `documents` on chat and on /tokenize's messages: a retrieval template renders them into the prompt;
    a document's value that is not a string is a 400."""
    import msgspec
    from test_frontend_tokenizer import DOCUMENTS_TEMPLATE
    tokenizer = Tokenizer(msgspec.structs.replace(smollm_tokenizer_spec, chat_template=DOCUMENTS_TEMPLATE))
    engine = ScriptedEngine(tokenizer)
    messages = [{"role": "user", "content": "Which city?"}]
    documents = [{"title": "Paris", "text": "The capital of France."}]
    assert post(engine, tokenizer, "/v1/chat/completions",
                {"messages": messages, "max_tokens": 1, "documents": documents}).status_code == 200
    expected = tokenizer.apply_chat_template(messages, documents=documents)
    assert engine.requests[0].prompt_token_ids == expected != tokenizer.apply_chat_template(messages)
    assert post(engine, tokenizer, "/tokenize", {"messages": messages, "documents": documents}).json()[
        "tokens"] == expected
    refused = post(engine, tokenizer, "/v1/chat/completions",
                   {"messages": messages, "max_tokens": 1, "documents": [{"title": 1}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"].startswith("documents")
    assert len(engine.requests) == 1


def test_strict_tools_under_auto_reach_the_engine_as_a_structural_tag(engine: ScriptedEngine,
                                                                       tokenizer: Tokenizer) -> None:
    """A strict tool with tool_choice auto constrains the calls (tests/test_structured_output.py says how); its bad
    schema is a 400 naming tools; without a strict tool the answer is free."""
    strict = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    body = {"messages": [{"role": "user", "content": "Weather?"}], "max_tokens": 2}
    assert post(engine, tokenizer, "/v1/chat/completions", body | {"tools": [strict]}).status_code == 200
    assert engine.requests[-1].params.structured_output.kind == "structural_tag"
    assert post(engine, tokenizer, "/v1/chat/completions", body | {"tools": [WEATHER_TOOL]}).status_code == 200
    assert engine.requests[-1].params.structured_output is None
    bad = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "nonsense"}}}
    refused = post(engine, tokenizer, "/v1/chat/completions", body | {"tools": [bad]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools", refused.text


def test_a_llama3_template_reads_bare_json_calls_whole_and_streamed(smollm_tokenizer_spec) -> None:
    import msgspec
    tokenizer = Tokenizer(msgspec.structs.replace(smollm_tokenizer_spec, chat_template=LLAMA3_TEMPLATE))
    assert tokenizer.chat_template.tool_call_format == "llama3_json"
    engine = ScriptedEngine(tokenizer)
    engine.script = tokenizer.encode('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL],
            "max_tokens": len(engine.script)}
    message = post(engine, tokenizer, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert message["content"] is None
    assert [call["function"] for call in message["tool_calls"]] == [{"name": "get_weather",
                                                                     "arguments": '{"city": "Paris"}'}]
    assert "get_weather" in tokenizer.decode(engine.requests[0].prompt_token_ids), "the template got the tools"
    chunks = sse_payloads(post(engine, tokenizer, "/v1/chat/completions", body | {"stream": True}))
    deltas = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls") or []]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"] and deltas[0]["index"] == 0
    assert "".join(delta["function"].get("arguments", "") for delta in deltas) == '{"city": "Paris"}'
    engine.script = tokenizer.encode("It is sunny in Paris.")
    plain = post(engine, tokenizer, "/v1/chat/completions", body | {"max_tokens": len(engine.script)}).json()
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny in Paris."} | {
        key: value for key, value in plain["choices"][0]["message"].items() if key not in ("role", "content")}
    assert not plain["choices"][0]["message"].get("tool_calls")


def test_tool_call_parser_reads_the_format_it_names_where_the_template_renders_tools(smollm_tokenizer_spec) -> None:
    """vLLM's --tool-call-parser: a template that renders tools without asking for Llama 3's JSON reads Hermes tags
    by default, bare JSON calls with llama3_json; a template that renders no tools keeps sfllm's Hermes description."""
    import msgspec
    plain_tools = ("{% if tools %}{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}"
                   "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")
    tokenizer = Tokenizer(msgspec.structs.replace(smollm_tokenizer_spec, chat_template=plain_tools))
    assert tokenizer.chat_template.takes_tools and tokenizer.chat_template.tool_call_format == "hermes"
    engine = ScriptedEngine(tokenizer)
    engine.script = tokenizer.encode('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL],
            "max_tokens": len(engine.script)}
    as_template_asks = post(engine, tokenizer, "/v1/chat/completions", body).json()["choices"][0]["message"]
    assert not as_template_asks.get("tool_calls") and as_template_asks["content"].startswith('{"name"')
    config = ServerConfig(tool_call_parser="llama3_json").frontend()
    forced = post(engine, tokenizer, "/v1/chat/completions", body, config).json()["choices"][0]["message"]
    assert [call["function"] for call in forced["tool_calls"]] == [{"name": "get_weather",
                                                                    "arguments": '{"city": "Paris"}'}]
    default_tokenizer = Tokenizer(smollm_tokenizer_spec)  # SmolLM2's template renders no tools
    engine = ScriptedEngine(default_tokenizer)
    engine.script = default_tokenizer.encode('<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    hermes = post(engine, default_tokenizer, "/v1/chat/completions", body | {"max_tokens": len(engine.script)},
                  config).json()["choices"][0]["message"]
    assert [call["function"] for call in hermes["tool_calls"]] == [{"name": "get_weather", "arguments": "{}"}]
    with pytest.raises(ConfigError, match="tool_call_parser must be one of None, hermes, llama3_json; got 'mistral'"):
        ServerConfig(tool_call_parser="mistral")


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_keeps_the_first_call_whole_and_streamed(tokenizer: Tokenizer,
                                                                          parallel: bool) -> None:
    """A model may write two calls whatever the request says; with parallel_tool_calls false the answer holds the
    first (as vLLM's), streamed or not."""
    two = "".join(f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>\n'
                  for city in ("Paris", "Rome"))
    engine = ScriptedEngine(tokenizer, max_context_length=512, script=two)
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER_TOOL],
            "max_tokens": len(engine.script), "parallel_tool_calls": parallel}
    cities = ["Paris", "Rome"] if parallel else ["Paris"]
    choice = post(engine, tokenizer, "/v1/chat/completions", body).json()["choices"][0]
    assert [json.loads(call["function"]["arguments"])["city"] for call in choice["message"]["tool_calls"]] == cities
    assert choice["message"]["content"] is None, "the dropped call is not text either"
    chunks = sse_payloads(post(engine, tokenizer, "/v1/chat/completions", body | {"stream": True}))
    deltas = [call for chunk in chunks for call in chunk["choices"][0]["delta"].get("tool_calls") or []]
    assert [delta["index"] for delta in deltas if delta.get("id")] == list(range(len(cities)))
    assert not any(chunk["choices"][0]["delta"].get("content") for chunk in chunks if chunk["choices"])


def test_chat_template_options_shape_the_prompt(smollm_tokenizer_spec) -> None:
    """vLLM's add_generation_prompt, continue_final_message and chat_template_kwargs reach the template; a
    combination that cannot hold is a 400 and reaches no engine."""
    import msgspec
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant{% if enable_thinking is false %} (no thinking){% endif %}"
                "{% if reasoning_effort %} ({{ reasoning_effort }} effort){% endif %}:{% endif %}")
    tokenizer = Tokenizer(msgspec.structs.replace(smollm_tokenizer_spec, chat_template=template))
    engine = ScriptedEngine(tokenizer)
    asked = [{"role": "user", "content": "Capital of France?"}]
    started = asked + [{"role": "assistant", "content": "The capital is"}]
    cases = [({"messages": asked}, "user: Capital of France?\nassistant:"),
             ({"messages": asked, "chat_template_kwargs": {"enable_thinking": False}},
              "user: Capital of France?\nassistant (no thinking):"),
             ({"messages": asked, "add_generation_prompt": False}, "user: Capital of France?\n"),
             ({"messages": started, "continue_final_message": True},
              "user: Capital of France?\nassistant: The capital is"),
             # OpenAI's reasoning_effort, as vLLM passes it: a variable of the template
             ({"messages": asked, "reasoning_effort": "low"}, "user: Capital of France?\nassistant (low effort):")]
    for body, prompt in cases:
        response = post(engine, tokenizer, "/v1/chat/completions", body | {"max_tokens": 2})
        assert response.status_code == 200, response.text
        assert tokenizer.decode(engine.requests[-1].prompt_token_ids) == prompt
    requests_sent = len(engine.requests)
    for body, param in [
            ({"messages": started, "continue_final_message": True, "add_generation_prompt": True},
             "continue_final_message"),
            ({"messages": asked, "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
            ({"messages": asked, "chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
            ({"messages": asked, "chat_template": "{{ messages }}"}, "chat_template"),
            ({"messages": asked, "reasoning_effort": "maximal"}, "reasoning_effort")]:
        response = post(engine, tokenizer, "/v1/chat/completions", body | {"max_tokens": 2})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert len(engine.requests) == requests_sent


def test_chat_echo_repeats_a_continued_assistant_message_before_the_answer(engine: ScriptedEngine,
                                                                         tokenizer: Tokenizer) -> None:
    """vLLM's chat `echo`: with a last message of the assistant's, whole answers start with its text and streams
    send it in a chunk of its own after the role's; a last message of the user's is not repeated."""
    started = [{"role": "user", "content": "Name a city."}, {"role": "assistant", "content": "The city is"}]
    body = {"messages": started, "continue_final_message": True, "add_generation_prompt": False, "max_tokens": 3,
            "echo": True, "n": 2}
    whole = post(engine, tokenizer, "/v1/chat/completions", body).json()
    generated = script_text(tokenizer, engine, 3)
    assert [choice["message"]["content"] for choice in whole["choices"]] == ["The city is" + generated] * 2
    streamed = sse_payloads(post(engine, tokenizer, "/v1/chat/completions", body | {"stream": True, "n": 1}))
    contents = [chunk["choices"][0]["delta"].get("content") for chunk in streamed if chunk["choices"]]
    assert contents[:2] == ["", "The city is"] and "".join(c or "" for c in contents) == "The city is" + generated
    asked = post(engine, tokenizer, "/v1/chat/completions",
                 {"messages": started[:1], "max_tokens": 3, "echo": True}).json()
    assert asked["choices"][0]["message"]["content"] == generated


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/completions", "use_beam_search", True),  # vLLM's
    ("/v1/chat/completions", "no_stop_trim", True),  # SGLang's
])
def test_other_servers_sampling_options_are_a_400_unless_inert(engine: ScriptedEngine, tokenizer: Tokenizer,
                                                              path: str, field: str, value: Any) -> None:
    """An option of vLLM or SGLang that would change the answer and that sfllm lacks is refused, not dropped; its
    value that changes nothing (use_beam_search false) is served."""
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    response = post(engine, tokenizer, path, {**body, "max_tokens": 2, field: value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field and "not supported" in response.json()["error"]["message"]
    assert not engine.requests
    inert = {"use_beam_search": False, "no_stop_trim": False}.get(field)
    if inert is not None:
        assert post(engine, tokenizer, path, {**body, "max_tokens": 2, field: inert}).status_code == 200


def test_allowed_token_ids_reach_the_engine_and_bad_values_are_a_400(engine: ScriptedEngine,
                                                                     tokenizer: Tokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for body, expected in [({"prompt": "x", "max_tokens": 2, "allowed_token_ids": [5, 3]}, [5, 3]),
                           ({**chat, "max_tokens": 2, "allowed_token_ids": [7]}, [7]),
                           ({"prompt": "x", "max_tokens": 2}, None)]:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        assert post(engine, tokenizer, path, body).status_code == 200
        assert engine.requests[-1].params.allowed_token_ids == expected
    sent = len(engine.requests)
    for body in [{"prompt": "x", "allowed_token_ids": []}, {"prompt": "x", "allowed_token_ids": [-1]},
                 {"prompt": "x", "allowed_token_ids": [10**9]}, {"prompt": "x", "allowed_token_ids": ["a"]},
                 {"prompt": "x", "allowed_token_ids": [3], "response_format": {"type": "json_object"}}]:
        response = post(engine, tokenizer, "/v1/completions", body | {"max_tokens": 2})
        param = response.json()["error"]["param"]  # a bad item is named by its index: allowed_token_ids[0]
        assert response.status_code == 400 and param.startswith("allowed_token_ids"), response.text
    assert len(engine.requests) == sent


def test_bad_words_reach_the_engine_tokenized_and_bad_values_are_a_400(engine: ScriptedEngine,
                                                                      tokenizer: Tokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "x"}]}
    expected = [tokenizer.encode_text("Paris"), tokenizer.encode_text(" Paris")]
    for body in ({"prompt": "x", "max_tokens": 2, "bad_words": ["Paris"]},
                 {**chat, "max_tokens": 2, "bad_words": [" Paris"]}):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        assert post(engine, tokenizer, path, body).status_code == 200
        assert engine.requests[-1].params.bad_words_token_ids == expected
    sent = len(engine.requests)
    for body in [{"prompt": "x", "bad_words": [" "]}, {"prompt": "x", "bad_words": [3]},
                 {"prompt": "x", "bad_words": "Paris"},
                 {"prompt": "x", "bad_words": ["Paris"], "response_format": {"type": "json_object"}}]:
        response = post(engine, tokenizer, "/v1/completions", body | {"max_tokens": 2})
        param = response.json()["error"]["param"]
        assert response.status_code == 400 and param.startswith("bad_words"), response.text
    assert len(engine.requests) == sent


def test_min_tokens_reaches_the_engine_and_bad_values_are_a_400(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for body, expected in [({"prompt": "x", "max_tokens": 6, "min_tokens": 4}, 4),
                           ({**chat, "max_tokens": 6, "min_new_tokens": 3}, 3), ({"prompt": "x", "max_tokens": 6}, 0)]:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        assert post(engine, tokenizer, path, body).status_code == 200
        assert engine.requests[-1].params.min_tokens == expected
    sent = len(engine.requests)
    for body, param in [({"prompt": "x", "max_tokens": 3, "min_tokens": 4}, "min_tokens"),
                        ({"prompt": "x", "min_tokens": -1}, "min_tokens"),
                        ({"prompt": "x", "min_tokens": 2, "response_format": {"type": "json_object"}}, "min_tokens"),
                        ({"prompt": "x", "min_tokens": 1, "stop_token_ids": [tokenizer.vocab_size]}, "stop_token_ids")]:
        response = post(engine, tokenizer, "/v1/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert len(engine.requests) == sent


def test_tokenize_and_detokenize_as_vllm_serves_them(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    """A prompt's ids (with and without its special tokens), a chat's ids as the chat endpoint sends them, the
    vocabulary's strings, and the text back; mistakes are 400s; no request reaches the engine."""
    body = post(engine, tokenizer, "/tokenize", {"prompt": "Hello world", "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.hello.max_context_length
    assert "".join(body["token_strs"]).replace("Ġ", " ") == "Hello world"
    bare = post(engine, tokenizer, "/tokenize", {"prompt": "Hello", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode("Hello", add_special_tokens=False) and bare["token_strs"] is None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How"}]
    chat = post(engine, tokenizer, "/tokenize", {"messages": messages, "continue_final_message": True}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                                           continue_final_message=True)
    post(engine, tokenizer, "/v1/chat/completions", {"messages": messages[:1], "tools": [WEATHER_TOOL],
                                                      "max_tokens": 1})
    with_tools = post(engine, tokenizer, "/tokenize", {"messages": messages[:1], "tools": [WEATHER_TOOL]}).json()
    assert with_tools["tokens"] == engine.requests[-1].prompt_token_ids, "the chat endpoint's prompt, tools and all"
    text = post(engine, tokenizer, "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert text == tokenizer.decode(chat["tokens"], skip_special_tokens=False) and text.endswith("Hello! How")
    sent = len(engine.requests)
    for path, request, param in [
            ("/tokenize", {"prompt": "x", "messages": messages}, "prompt"), ("/tokenize", {}, "prompt"),
            ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
            ("/tokenize", {"messages": messages, "chat_template": "{{ messages }}"}, "chat_template"),
            ("/detokenize", {"tokens": [tokenizer.num_known_tokens]}, "tokens"),
            ("/detokenize", {"tokens": [-1]}, "tokens[0]")]:
        response = post(engine, tokenizer, path, request)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param, response.text
    assert len(engine.requests) == sent


def bos_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """SmolLM2's tokenizer made to put a BOS (<|im_start|>, id 1) before every prompt, as Llama's puts its own."""
    import msgspec
    import tokenizers
    backend = tokenizers.Tokenizer.from_str(spec.tokenizer_json)
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 1)])
    return Tokenizer(msgspec.structs.replace(spec, tokenizer_json=backend.to_str()))


def test_add_special_tokens_decides_whether_a_prompt_gets_the_tokenizers_bos(smollm_tokenizer_spec: TokenizerSpec
                                                                             ) -> None:
    """vLLM's add_special_tokens. Completions: a text prompt gets the BOS unless false (a client that rendered its
    own template sends false), token ids go as they are. Chat: the template writes its own BOS, and true adds the
    tokenizer's again, as vLLM does; /tokenize of the messages says the same."""
    tokenizer = bos_tokenizer(smollm_tokenizer_spec)
    engine = ScriptedEngine(tokenizer)
    text_ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert text_ids and text_ids[0] != 1
    for body, expected in [({"prompt": "Hello world"}, [1, *text_ids]),
                           ({"prompt": "Hello world", "add_special_tokens": True}, [1, *text_ids]),
                           ({"prompt": "Hello world", "add_special_tokens": False}, text_ids),
                           ({"prompt": ["Hello world"], "add_special_tokens": False}, text_ids),
                           ({"prompt": text_ids}, text_ids)]:
        assert post(engine, tokenizer, "/v1/completions", body | {"max_tokens": 1}).status_code == 200
        assert engine.requests[-1].prompt_token_ids == expected, body
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages)
    assert rendered[0] == 1 and rendered[1] != 1, "the template's own BOS, once"
    for option, expected in [({}, rendered), ({"add_special_tokens": False}, rendered),
                             ({"add_special_tokens": True}, [1, *rendered])]:
        response = post(engine, tokenizer, "/v1/chat/completions", {"messages": messages, "max_tokens": 1} | option)
        assert response.status_code == 200 and engine.requests[-1].prompt_token_ids == expected, option
        assert post(engine, tokenizer, "/tokenize", {"messages": messages} | option).json()["tokens"] == expected


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(engine: ScriptedEngine, tokenizer: Tokenizer) -> None:
    """vLLM's left truncation, on both endpoints: the engine gets the last k tokens, an echo shows them, -1 keeps
    what the context holds, and more than the context is a 400."""
    prompt = tokenizer.encode("one two three four five six seven eight")
    body = post(engine, tokenizer, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "echo": True,
                                                       "truncate_prompt_tokens": 3}).json()
    assert engine.requests[-1].prompt_token_ids == prompt[-3:]
    assert body["choices"][0]["text"].startswith(tokenizer.decode(prompt[-3:])) and body["usage"]["prompt_tokens"] == 3
    post(engine, tokenizer, "/v1/completions", {"prompt": "one two three", "max_tokens": 1,
                                                "truncate_prompt_tokens": -1})
    assert engine.requests[-1].prompt_token_ids == tokenizer.encode("one two three")
    messages = [{"role": "user", "content": "Hi"}]
    post(engine, tokenizer, "/v1/chat/completions", {"messages": messages, "max_tokens": 1,
                                                     "truncate_prompt_tokens": 4})
    assert engine.requests[-1].prompt_token_ids == tokenizer.apply_chat_template(messages)[-4:]
    sent = len(engine.requests)
    for value in (engine.hello.max_context_length + 1, 0, -2):
        response = post(engine, tokenizer, "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": value})
        assert response.status_code == 400 and response.json()["error"]["param"] == "truncate_prompt_tokens"
    assert len(engine.requests) == sent


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_return_token_ids_gives_the_prompts_and_the_outputs_ids_streamed_or_not(
        engine: ScriptedEngine, tokenizer: Tokenizer, path: str) -> None:
    """vLLM's return_token_ids, as RL clients read it: completions carry prompt_token_ids and token_ids per choice,
    chat carries prompt_token_ids on the response (a stream's role chunks) and token_ids per choice; a stream's ids
    join into the whole answer's, also where a stop string holds text back."""
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    body |= {"max_tokens": 12, "n": 2, "stop": "lazy", "return_token_ids": True}
    whole = post(engine, tokenizer, path, body).json()
    prompt_ids = engine.requests[-1].prompt_token_ids
    script_ids = tokenizer.encode(SCRIPT, add_special_tokens=False)
    for choice in whole["choices"]:
        assert choice["token_ids"] == script_ids[:len(choice["token_ids"])] and choice["finish_reason"] == "stop"
        if path == "/v1/completions":
            assert choice["prompt_token_ids"] == prompt_ids
    if path == "/v1/chat/completions":
        assert whole["prompt_token_ids"] == prompt_ids
    chunks = sse_payloads(post(engine, tokenizer, path, {**body, "stream": True}))
    streamed: dict[int, list[int]] = {}
    prompts = []
    for chunk in chunks:
        prompts += [chunk["prompt_token_ids"]] if "prompt_token_ids" in chunk else []
        for choice in chunk["choices"]:
            streamed.setdefault(choice["index"], []).extend(choice.get("token_ids") or [])
            prompts += [choice["prompt_token_ids"]] if "prompt_token_ids" in choice else []
    assert prompts == [prompt_ids, prompt_ids], "once per choice, in its first chunk"
    assert streamed == {choice["index"]: choice["token_ids"] for choice in whole["choices"]}
    plain = post(engine, tokenizer, path, {**body, "return_token_ids": False}).text
    assert "token_ids" not in plain
