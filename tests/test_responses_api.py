"""POST /v1/responses (OpenAI's Responses API) through the app, on a scripted engine: the input's items as the chat
conversation they amount to, the output items whole and streamed as events, and what is refused."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from sfllm.config import ServerConfig
from sfllm.frontend.app import create_app
from sfllm.frontend.responses_protocol import ResponsesRequest
from sfllm.frontend.tokenizer import Tokenizer
from test_frontend_app import ScriptedEngine

TOOLS = [{"type": "function", "name": "get_weather", "description": "The weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def respond(tokenizer: Tokenizer, script: str, body: dict[str, Any], reasoning_parser: str | None = None,
            engine: ScriptedEngine | None = None) -> httpx.Response:
    engine = engine or ScriptedEngine(tokenizer, max_context_length=512, script=script)
    app = create_app(ServerConfig(reasoning_parser=reasoning_parser).frontend(), engine, tokenizer)  # type: ignore

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            # json.dumps escapes an unpaired surrogate, as a client's JSON may carry one
            return await client.post("/v1/responses", content=json.dumps(body),
                                     headers={"content-type": "application/json"})
    return asyncio.run(send())


def events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("text/event-stream")
    parsed = []
    for block in response.text.strip().split("\n\n"):
        kind, data = block.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {payload['type']}"
        parsed.append(payload)
    assert [e["sequence_number"] for e in parsed] == list(range(len(parsed)))
    return parsed


def test_input_items_become_the_chat_conversation() -> None:
    body = ResponsesRequest.model_validate({"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather"}, {"type": "input_text", "text": "?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Tool."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": "rain"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sun and rain."}]},
        {"role": "user", "content": "Thanks"}],
        "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 7,
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}}})
    chat = body.chat_request()
    assert [(m.role, m.text(), m.reasoning_content) for m in chat.messages] == [
        ("system", "Be brief.", None), ("user", "Weather\n?", None), ("assistant", "", "Tool."),
        ("tool", "sunny", None), ("tool", "rain", None), ("assistant", "Sun and rain.", None), ("user", "Thanks", None)]
    assert [(c.id, c.function.name) for c in chat.messages[2].tool_calls] == [("c1", "get_weather"),
                                                                              ("c2", "get_weather")]
    assert chat.tools[0].function.name == "get_weather" and chat.tool_choice.function.name == "get_weather"
    assert chat.max_completion_tokens == 7 and chat.response_format.json_schema.schema_ == {"type": "object"}


def test_a_whole_answer_with_reasoning_and_text(tokenizer: Tokenizer) -> None:
    answer = "<think>Easy.</think>It is 4."
    reply = respond(tokenizer, answer, {"input": "2 + 2?", "max_output_tokens": len(tokenizer.encode(answer))},
                    reasoning_parser="qwen3").json()
    assert reply["object"] == "response" and reply["id"].startswith("resp_")
    reasoning, message = reply["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text", "text": "Easy."}]
    assert reasoning["status"] == "completed" and message["type"] == "message" and message["role"] == "assistant"
    assert message["status"] == "incomplete", "the item max_output_tokens cut"
    assert message["content"][0]["type"] == "output_text" and message["content"][0]["text"] == "It is 4."
    # the scripted engine ends every answer at its token budget
    assert reply["status"] == "incomplete" and reply["incomplete_details"] == {"reason": "max_output_tokens"}
    usage = reply["usage"]
    assert usage["output_tokens"] == len(tokenizer.encode(answer))
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 0 < usage["output_tokens_details"]["reasoning_tokens"] < usage["output_tokens"]


def test_a_streamed_answer_opens_fills_and_closes_each_item_in_order(tokenizer: Tokenizer) -> None:
    answer = "<think>Easy.</think>It is 4."
    body = {"input": "2 + 2?", "max_output_tokens": len(tokenizer.encode(answer)), "stream": True}
    stream = events(respond(tokenizer, answer, body, reasoning_parser="qwen3"))
    kinds = [e["type"] for e in stream]
    compact = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]  # runs of deltas as one
    assert compact == ["response.created", "response.in_progress",
                       "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
                       "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                       "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                       "response.output_text.done", "response.content_part.done", "response.output_item.done",
                       "response.incomplete"]
    assert "".join(e["delta"] for e in stream if e["type"] == "response.reasoning_text.delta") == "Easy."
    assert "".join(e["delta"] for e in stream if e["type"] == "response.output_text.delta") == "It is 4."
    final = stream[-1]["response"]
    whole = respond(tokenizer, answer, {**body, "stream": False}, reasoning_parser="qwen3").json()
    assert [(item["type"], item.get("content")) for item in final["output"]] == [
        (item["type"], item.get("content")) for item in whole["output"]]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_function_call_items(tokenizer: Tokenizer, stream: bool) -> None:
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    body = {"input": "Weather in Paris?", "tools": TOOLS, "max_output_tokens": len(tokenizer.encode(answer)),
            "stream": stream}
    reply = respond(tokenizer, answer, body)
    if stream:
        stream_events = events(reply)
        arguments = "".join(e["delta"] for e in stream_events if e["type"] == "response.function_call_arguments.delta")
        assert json.loads(arguments) == {"city": "Paris"}
        output = stream_events[-1]["response"]["output"]
    else:
        output = reply.json()["output"]
    [call] = output
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["call_id"]
    assert json.loads(call["arguments"]) == {"city": "Paris"}


def test_parallel_tool_calls_false_gives_one_function_call_item(tokenizer: Tokenizer) -> None:
    two = "".join(f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>\n'
                  for city in ("Paris", "Rome"))
    body = {"input": "Weather?", "tools": TOOLS, "max_output_tokens": len(tokenizer.encode(two))}
    assert len(respond(tokenizer, two, body).json()["output"]) == 2
    [call] = respond(tokenizer, two, body | {"parallel_tool_calls": False}).json()["output"]
    assert json.loads(call["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize("body, param, message", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id", "stores no response"),
    ({"input": "x", "background": True}, "background", "not supported"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "runs no tool"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content",
     "text only"),
    ({"input": [{"type": "computer_call", "id": "1"}]}, "input[0].type", "not supported"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input", "role"),
    ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format", "not supported"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include", "logprobs"),
    ({"input": []}, "input", ""),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "input holds no message to answer"),
    # errors name the Responses field the client sent, not the chat one it became
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": 5}}}}, "text.format",
     "json schema"),
    ({"input": "x" * 3000}, "input", ""),
    ({"input": "x", "max_output_tokens": 120}, "input", "the prompt or max_output_tokens."),
    ({"input": "x", "tools": [{"type": "function", "description": "no name"}]}, "tools", "name"),
    ({"input": "x", "conversation": "conv_1"}, "conversation", "not supported"),
    ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt", "not supported"),
    ({"input": "x", "n": 2}, "n", "one answer"),
    ({"input": "x", "metadata": {"k": "\ud800"}}, "metadata", "surrogate"),
    ({"input": "x", "max_tokens": 5}, "max_tokens", "use max_output_tokens"),
    ({"input": "x", "logprobs": True}, "logprobs", "chat field"),
    ({"input": "x", "reasoning": {"effort": "maximal"}}, "reasoning.effort", "one of none, minimal, low"),
    ({"input": "x", "reasoning_effort": "low"}, "reasoning_effort", "use reasoning.effort"),
    # an output answers a call before it, as OpenAI requires: not a later one, not one of another id
    ({"input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c1", "output": "4"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]},
     "input[1].call_id", "no function_call before this function_call_output has call_id 'c1'"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c2", "output": "4"}]}, "input[1].call_id", "'c2'"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id", "needs its call_id"),
])
def test_what_it_cannot_do_is_a_400_naming_the_field(tokenizer: Tokenizer, body: dict[str, Any], param: str,
                                                      message: str) -> None:
    engine = ScriptedEngine(tokenizer)
    reply = respond(tokenizer, "x", body, engine=engine)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert not engine.requests


def test_vllm_extensions_reach_the_engine_and_stored_responses_are_a_clear_404(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    body = {"input": "x", "max_output_tokens": 2, "top_k": 5, "seed": 3, "guided_regex": "[0-9]+"}
    assert respond(tokenizer, "x", body, engine=engine).status_code == 200
    params = engine.requests[-1].params
    assert (params.top_k, params.seed, params.structured_output.definition) == (5, 3, "[0-9]+")
    app = create_app(ServerConfig().frontend(), engine, tokenizer)  # type: ignore[arg-type]

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/v1/responses/resp_1")
    reply = asyncio.run(get())
    assert reply.status_code == 404 and "stores no response" in reply.json()["error"]["message"]


def test_a_thought_belongs_to_the_assistant_turn_right_after_it() -> None:
    chat = ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": "a"}, {"type": "reasoning", "summary": [{"type": "summary_text", "text": "S1"},
                                                                             {"type": "summary_text", "text": "S2"}]},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "S1"}, {"type": "summary_text", "text": "S2"}]},
        {"role": "assistant", "content": "d"}]}).chat_request()
    assert [m.reasoning_content for m in chat.messages] == [None, None, None, "S1\n\nS2"]


def test_reasoning_effort_joins_the_clients_template_variables() -> None:
    chat = ResponsesRequest.model_validate({"input": "x", "reasoning": {"effort": "low"},
                                            "chat_template_kwargs": {"enable_thinking": False}}).chat_request()
    assert chat.template_options()["variables"] == {"enable_thinking": False, "reasoning_effort": "low"}
    # the client's own variable of that name is the one the template reads
    chat = ResponsesRequest.model_validate({"input": "x", "reasoning": {"effort": "low"},
                                            "chat_template_kwargs": {"reasoning_effort": "high"}}).chat_request()
    assert chat.template_options()["variables"] == {"reasoning_effort": "high"}


def test_a_whole_call_before_a_cut_one_is_completed(tokenizer: Tokenizer) -> None:
    """max_output_tokens cut the model's second call before its name: the first call is whole, and so marked."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    answer = call + '\n<tool_call>\n{"name":'
    reply = respond(tokenizer, answer, {"input": "Weather?", "tools": TOOLS,
                                        "max_output_tokens": len(tokenizer.encode(answer))}).json()
    [call] = reply["output"]
    assert reply["status"] == "incomplete" and call["status"] == "completed" and call["name"] == "get_weather"
