"""The OpenAI API of a launched server, through the official `openai` client (real processes)."""
from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time

import httpx
import openai
import pytest

from sfllm import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["timezone"],
             "properties": {"timezone": {"type": "string", "maxLength": 30}}}}}]
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "population", "coastal"],
        "properties": {"city": {"type": "string", "maxLength": 24},
                       "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
                       "coastal": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default model, with Qwen3's reasoning parser (inert unless an answer opens with <think>)."""
    from servers import LaunchedServer
    launched = LaunchedServer(tmp_path_factory.mktemp("server"), "--reasoning-parser", "qwen3")
    yield launched
    launched.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_the_served_model(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_sglangs_server_info_reports_the_engines_limits(server) -> None:
    from sfllm.config import ServerConfig
    defaults = ServerConfig()
    info = httpx.get(f"{server.url}/get_server_info", timeout=10).json()
    kv_blocks = httpx.get(f"{server.url}/health", timeout=10).json()["kv_blocks_total"]
    assert (info["max_running_requests"], info["chunked_prefill_size"], info["tp_size"]) == (
        defaults.max_running_requests, defaults.max_running_tokens, 1)
    assert info["max_total_num_tokens"] == kv_blocks * info["page_size"] > 0 and info["model_path"] == MODEL


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
    assert stopped.choices[0].model_extra["stop_reason"] == "7" and reply.choices[0].model_extra["stop_reason"] is None
    # vLLM's stop_token_ids: the token ends the answer, its text only with include_stop_str_in_output
    offsets = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=4, logprobs=0,
                                        extra_body={"return_token_ids": True}).choices[0]
    third, starts = offsets.model_extra["token_ids"][2], offsets.logprobs.text_offset
    for kept in (False, True):
        by_token = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=12,
                                             extra_body={"stop_token_ids": [third], "include_stop_str_in_output": kept})
        choice = by_token.choices[0]
        assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", third)
        assert choice.text == offsets.text[:starts[3] if kept else starts[2]] and by_token.usage.completion_tokens == 3


def test_flush_cache_empties_the_prefix_cache(server) -> None:
    """SGLang's /flush_cache and vLLM's /reset_prefix_cache: a repeated prompt hits the cache, and misses it once
    the cache is flushed."""
    body = {"prompt": "Count with me: " + ", ".join(str(i) for i in range(60)), "max_tokens": 1}

    def cached_tokens() -> int:
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        return reply["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached_tokens()
    assert cached_tokens() > 0
    for method, path in (("POST", "/flush_cache"), ("GET", "/flush_cache"), ("POST", "/reset_prefix_cache")):
        flush = httpx.request(method, f"{server.url}{path}", timeout=10)
        assert flush.status_code == 200 and flush.json() == {"status": "flushed"}
        assert cached_tokens() == 0
        assert cached_tokens() > 0


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
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"49152": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"the": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "regex", "regex": "[a-"}}, 400,
     "response_format"),
    # a schema the grammar engine takes but cannot mask (a $ref to itself alone): found by the engine, named as sent
    ("/v1/completions", {"prompt": "hi", "guided_json": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}},
     400, "guided_json"),
    ("/v1/chat/completions", {"messages": CAPITAL, "functions": [{"name": "f"}]}, 400, "functions"),
    ("/v1/chat/completions", {"messages": CAPITAL, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": CAPITAL, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": CAPITAL, "tools": TOOLS,
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": CAPITAL, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": "x"}}}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": CAPITAL + [{"role": "tool", "content": "22"}]}, 400, "messages[1]"),
    ("/v1/chat/completions", {"messages": CAPITAL + [{"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}]}]},
     400, "messages[1]"),
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


# ---- structured outputs, tools, prompt logprobs ---------------------------------------------------------

def streamed_chat(client, **kwargs) -> tuple[str, dict[int, dict], str | None]:
    """The stream's text, its tool calls assembled from their deltas by index, and its finish reason."""
    text, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or delta.id
                call["name"] += delta.function.name or "" if delta.function else ""
                call["arguments"] += delta.function.arguments or "" if delta.function else ""
            finish = choice.finish_reason or finish
    return text, calls, finish


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_json_schema_answers_validate_and_stream_the_same(client, temperature: float) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for question in ["Give me the largest city of France as JSON.", "Describe Tokyo.", "Hello!"]:
        kwargs = dict(messages=[{"role": "user", "content": question}], temperature=temperature, seed=11,
                      max_tokens=60, response_format=response_format)
        reply = client.chat.completions.create(model=MODEL, **kwargs)
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content), CITY)
        text, calls, finish = streamed_chat(client, **kwargs)
        assert (text, calls, finish) == (reply.choices[0].message.content, {}, "stop")
    plain = client.completions.create(model=MODEL, prompt="A JSON object about a cat:", temperature=0, max_tokens=40,
                                      extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(plain.choices[0].text), dict)


def test_vllm_and_sglang_constraint_fields_constrain_the_answer(client) -> None:
    """Their clients' fields, through the official client's extra_body: vLLM's guided_choice and structured_outputs,
    SGLang's json_schema (JSON text)."""
    choices = ["Paris", "Lyon", 'not "sure"']
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=10, temperature=1.0, seed=seed,
                                               extra_body={"guided_choice": choices})
        assert reply.choices[0].message.content in choices and reply.choices[0].finish_reason == "stop"
    year = client.completions.create(model=MODEL, prompt="The Eiffel Tower was built in", max_tokens=8,
                                     extra_body={"structured_outputs": {"regex": " [0-9]{4}"}})
    assert re.fullmatch(" [0-9]{4}", year.choices[0].text), year.choices[0].text
    jsonschema = pytest.importorskip("jsonschema")
    city = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe Tokyo."}],
                                          max_tokens=60, temperature=0, extra_body={"json_schema": json.dumps(CITY)})
    jsonschema.validate(json.loads(city.choices[0].message.content), CITY)


def test_a_structural_tag_binds_each_structure_the_answer_opens_streamed_or_not(client) -> None:
    """response_format of type structural_tag (vLLM's and SGLang's): the answer's " is" opens the structure, whose
    schema and end follow; the stream gives the same text."""
    tag = {"type": "structural_tag", "triggers": [" is"],
           "structures": [{"begin": " is", "schema": CITY, "end": "."}]}
    kwargs = dict(messages=CAPITAL, temperature=0, max_tokens=60, extra_body={"response_format": tag})
    reply = client.chat.completions.create(model=MODEL, **kwargs)
    text = reply.choices[0].message.content
    jsonschema = pytest.importorskip("jsonschema")
    values, start = [], text.find(" is")
    while start >= 0:  # each structure: the JSON value right after the trigger, then its end
        value, stop = json.JSONDecoder().raw_decode(text, start + len(" is"))
        assert text.startswith(".", stop), text
        values.append(jsonschema.validate(value, CITY) or value)
        start = text.find(" is", stop)
    assert values, text
    assert streamed_chat(client, **kwargs) == (text, {}, reply.choices[0].finish_reason)


def test_return_token_ids_through_the_official_client(client, smollm_llm) -> None:
    """vLLM's return_token_ids as RL frameworks read it off the official client's objects: the ids are the model's
    own (the offline API's greedy answer, its prompt's encoding)."""
    prompt = "The capital of France is"
    expected = smollm_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6))[0]
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6,
                                      extra_body={"return_token_ids": True})
    assert reply.choices[0].token_ids == expected.outputs[0].token_ids
    assert reply.choices[0].prompt_token_ids == expected.prompt_token_ids
    chat = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=6,
                                          extra_body={"return_token_ids": True})
    assert len(chat.choices[0].token_ids) == chat.usage.completion_tokens
    assert len(chat.prompt_token_ids) == chat.usage.prompt_tokens


def test_responses_api_through_the_official_client(client) -> None:
    """The Responses API as the openai SDK (and the agents built on it) calls it: the greedy answer equals the chat
    endpoint's, streamed or not; a required function tool comes back as a function_call item the SDK parses, and
    its output sent back as an input item continues the conversation."""
    chat = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=12)
    reply = client.responses.create(model=MODEL, input=CAPITAL[0]["content"], temperature=0, max_output_tokens=12)
    assert reply.output_text == chat.choices[0].message.content
    assert reply.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    with client.responses.stream(model=MODEL, input=CAPITAL[0]["content"], temperature=0,
                                 max_output_tokens=12) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == reply.output_text
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = client.responses.create(model=MODEL, input=question, tools=tools, tool_choice="required",
                                     parallel_tool_calls=False, temperature=0, max_output_tokens=60)
    [call] = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    answer = client.responses.create(model=MODEL, tools=tools, temperature=0, max_output_tokens=12, input=[
        *question, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}])
    assert answer.output and answer.usage.input_tokens > called.usage.input_tokens


def test_sglangs_native_generate_against_a_launched_server(server, smollm_llm) -> None:
    """POST /generate as SGLang's RL clients call it: token ids in, the model's own ids and their logprobs out
    (the offline API's greedy answer)."""
    prompt_ids = smollm_llm.tokenizer.encode("The capital of France is")
    expected = smollm_llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=6, logprobs=0))[0]
    reply = httpx.post(f"{server.url}/generate", timeout=60, json={
        "input_ids": prompt_ids, "sampling_params": {"temperature": 0, "max_new_tokens": 6}, "return_logprob": True})
    answer = reply.json()
    assert answer["output_ids"] == expected.outputs[0].token_ids and answer["text"] == expected.outputs[0].text
    logprobs = [entry[0] for entry in answer["meta_info"]["output_token_logprobs"]]
    output = expected.outputs[0]
    assert logprobs == pytest.approx([entries[t].logprob for t, entries in zip(output.token_ids, output.logprobs)],
                                     abs=1e-4)
    assert answer["meta_info"]["prompt_tokens"] == len(prompt_ids)
    # a stop token ends it: its id is `matched` and ends output_ids, its text is trimmed unless no_stop_trim
    third = expected.outputs[0].token_ids[2]
    for trim in (True, False):
        stopped = httpx.post(f"{server.url}/generate", timeout=60, json={"input_ids": prompt_ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": 6, "stop_token_ids": [third], "no_stop_trim": not trim}}).json()
        assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": third}
        assert stopped["output_ids"] == expected.outputs[0].token_ids[:3]
        shown = expected.outputs[0].token_ids[:2 if trim else 3]
        assert stopped["text"] == smollm_llm.tokenizer.decode(shown)


def test_sglangs_abort_request_ends_a_stream_by_its_rid_and_everything_with_abort_all(server) -> None:
    """SGLang's /abort_request as RL rollouts use it: a streamed /generate named by its rid ends at once with an
    abort finish reason; `abort_all` ends whole requests in flight the same way; an unknown rid aborts nothing."""
    long = {"sampling_params": {"max_new_tokens": 3000, "temperature": 0, "ignore_eos": True}}
    events: list[dict] = []
    with httpx.stream("POST", f"{server.url}/generate", timeout=120,
                      json={"text": "Count:", "rid": "rollout-1", "stream": True} | long) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line.removeprefix("data: ")))
                if len(events) == 1:
                    assert httpx.post(f"{server.url}/abort_request", json={"rid": "rollout-1"},
                                      timeout=10).json() == {"aborted": 1}
    meta = events[-1]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["id"] == "rollout-1"
    assert 0 < meta["completion_tokens"] < 3000
    answers: list[dict] = []
    threads = [threading.Thread(target=lambda: answers.append(httpx.post(
        f"{server.url}/generate", json={"text": "Count:"} | long, timeout=120).json())) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while sum(httpx.get(f"{server.url}/health", timeout=10).json()["running"].values()) < 2:
        assert time.monotonic() < deadline, "both requests running"
        time.sleep(0.05)
    assert httpx.post(f"{server.url}/abort_request", json={"abort_all": True}, timeout=10).json() == {"aborted": 2}
    for thread in threads:
        thread.join(60)
    assert [answer["meta_info"]["finish_reason"]["type"] for answer in answers] == ["abort", "abort"]
    assert all(answer["meta_info"]["completion_tokens"] < 3000 for answer in answers)
    assert httpx.post(f"{server.url}/abort_request", json={"rid": "nobody"}, timeout=10).json() == {"aborted": 0}


def test_sglangs_prompt_logprobs_are_the_echoed_ones_of_completions(server, client) -> None:
    """/generate with `max_new_tokens` 0 and `logprob_start_len`, as SGLang's select() and scorers send it: the
    prompt's logprobs are those /v1/completions echoes for lm-eval's loglikelihood, and no token is generated."""
    prompt = "The capital of France is"
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=2).choices[0]
    for start in (0, 3):
        reply = httpx.post(f"{server.url}/generate", timeout=60, json={
            "text": prompt, "sampling_params": {"max_new_tokens": 0, "temperature": 0}, "return_logprob": True,
            "logprob_start_len": start, "top_logprobs_num": 2, "return_text_in_logprobs": True}).json()
        meta = reply["meta_info"]
        entries, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
        assert len(entries) == len(tops) == meta["prompt_tokens"] - start
        assert [entry[2] for entry in entries] == echo.logprobs.tokens[start:]
        assert entries[0][0] is None and tops[0] is None
        assert [entry[0] for entry in entries[1:]] == pytest.approx(echo.logprobs.token_logprobs[start + 1:], abs=1e-4)
        for top, echoed in zip(tops[1:], echo.logprobs.top_logprobs[start + 1:]):
            assert len(top) == 2 and top[0][0] == pytest.approx(max(echoed.values()), abs=1e-4)
        assert (reply["text"], reply["output_ids"], meta["completion_tokens"]) == ("", [], 0)
        assert meta["finish_reason"] == {"type": "length", "length": 0} and meta["output_token_logprobs"] == []


def test_forced_tool_calls_stream_the_same_and_round_trip(client) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        kwargs = dict(messages=ask, temperature=0, max_tokens=80, tools=TOOLS, tool_choice=choice)
        reply = client.chat.completions.create(model=MODEL, **kwargs)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        assert message.content is None and message.tool_calls
        for call in message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if isinstance(choice, dict):
            assert [c.function.name for c in message.tool_calls] == ["get_time"]
        text, calls, finish = streamed_chat(client, **kwargs)
        assert (text, finish) == ("", "tool_calls")
        assert [(c["name"], c["arguments"]) for c in calls.values()] == [
            (c.function.name, c.function.arguments) for c in message.tool_calls]
        assert all(c["id"].startswith("call_") for c in calls.values())
    call = message.tool_calls[0]
    history = ask + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "14:05 in Paris"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0, max_tokens=30)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS, tool_choice="none", temperature=0,
                                          max_tokens=16)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_echo_with_logprobs_returns_the_prompts_in_openai_layout(client, smollm_llm) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1, echo=True, logprobs=2)
    logprobs = reply.choices[0].logprobs
    prompt_ids = smollm_llm.tokenizer.encode(prompt)
    assert reply.choices[0].text.startswith(prompt)
    assert len(logprobs.tokens) == len(prompt_ids) + 1
    assert "".join(logprobs.tokens[:len(prompt_ids)]) == prompt
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    offline = smollm_llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
    assert offline.prompt_logprobs[0] is None
    assert logprobs.token_logprobs[1:len(prompt_ids)] == pytest.approx(
        [entries[t].logprob for t, entries in zip(prompt_ids[1:], offline.prompt_logprobs[1:])], abs=1e-4)
    for top, entries in zip(logprobs.top_logprobs[1:], offline.prompt_logprobs[1:]):
        likeliest = next(entry for entry in entries.values() if entry.rank == 1)
        assert len(top) >= 2 and max(top.values()) == pytest.approx(likeliest.logprob, abs=1e-4)
    scored = client.completions.create(model=MODEL, prompt=[prompt_ids], max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0  # lm-eval's loglikelihood
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:len(prompt_ids)],
                                                                          abs=1e-4)
    chat = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=1, extra_body={"prompt_logprobs": 0})
    extension = chat.choices[0].model_extra["prompt_logprobs"]
    assert extension[0] is None and len(extension) == chat.usage.prompt_tokens
    assert all(len(entry) == 1 and list(entry.values())[0]["logprob"] <= 0 and list(entry.values())[0]["rank"] >= 1
               for entry in extension[1:])


def test_logit_bias_changes_the_answer(client, smollm_llm) -> None:
    plain = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=3)
    assert plain.choices[0].text.startswith(" 5")
    banana = smollm_llm.tokenizer.encode(" banana")[0]
    biased = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0.7, max_tokens=3,
                                       logit_bias={str(banana): 100})
    assert biased.choices[0].text == smollm_llm.tokenizer.decode([banana] * 3)


def test_a_thinking_answer_gives_its_reasoning_apart_streamed_or_not(client) -> None:
    """SmolLM2 does not think: a regular expression makes it write a think block first, as Qwen3 does."""
    thinking = {"type": "regex", "regex": "<think>[a-z ]{8,30}</think>[A-Z][a-z ]{8,30}"}
    kwargs = dict(messages=CAPITAL, temperature=0, max_tokens=80, extra_body={"response_format": thinking})
    message = client.chat.completions.create(model=MODEL, **kwargs).choices[0].message
    assert re.fullmatch("[a-z ]{8,30}", message.reasoning_content), message
    assert re.fullmatch("[A-Z][a-z ]{8,30}", message.content), message
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == (message.reasoning_content, message.content)
    plain = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=8)
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None
