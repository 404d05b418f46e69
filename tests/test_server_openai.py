"""The OpenAI API of a launched server, through the official `openai` client (real processes)."""
from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from sfllm import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_greedy_answers_paris_and_streaming_equals_non_streaming(client) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=32)
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    stream = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=32, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text
    assert roles == ["assistant"]
    assert finish == "stop"
    assert usage.completion_tokens == reply.usage.completion_tokens


def test_completions_max_tokens_stop_and_usage(client) -> None:
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stop=["7"])
    assert stopped.choices[0].finish_reason == "stop"
    assert "7" not in stopped.choices[0].text
    assert reply.choices[0].text.startswith(stopped.choices[0].text)
    assert stopped.usage.completion_tokens < 12


def test_completions_n_seed_and_logprobs(client) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", temperature=1.0, max_tokens=10, seed=1234, n=3)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices], "same seed, same text"
    assert len({c.text for c in first.choices}) > 1, "the n choices are different samples"
    with_logprobs = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                              max_tokens=4, logprobs=3)
    logprobs = with_logprobs.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and len(logprobs.token_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4), "greedy picks the most likely token"


def test_chat_logprobs(client) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=5,
                                           logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in content)


def test_32_concurrent_streams_complete_and_match_the_offline_api(client, smollm_llm) -> None:
    prompts = [f"Write a number after {i}:" for i in range(32)]

    def stream(prompt: str) -> str:
        chunks = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        streamed = list(pool.map(stream, prompts))
    offline = smollm_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    assert streamed == [r.outputs[0].text for r in offline]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, 400, "prompt"),  # context_length_exceeded
    ("/v1/completions", {"prompt": "hi", "temperature": 7}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": "three"}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-17"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "model": "m" * 3_000_000}, 404, "model"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', 400, "model"),
    ("/v1/chat/completions", b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
    ("/v1/completions", {"prompt": "word " * 9000, "max_tokens": 4}, 400, "prompt"),
])
def test_bad_input_is_an_openai_error_and_the_connection_still_serves(server, path: str, body, status: int,
                                                                      param: str) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:  # one connection for both requests
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = client.post(path, content=content, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text[:1000]
        assert len(response.content) < 1000, "the answer does not echo a long value"
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert error["message"] and error["param"] == param
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
        assert client.post(path, content=content, headers={"content-type": "application/json"}).status_code == status


def test_malformed_json_is_400(server) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "error" in response.json()


def test_prompt_too_long_names_the_numbers(server) -> None:
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": "word " * 9000, "max_tokens": 4}, timeout=60)
    message = response.json()["error"]["message"]
    assert "8192" in message, message


def test_docs_and_openapi(server) -> None:
    assert httpx.get(f"{server.url}/docs", timeout=30).status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert "/v1/chat/completions" in schema["paths"]
