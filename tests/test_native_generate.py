"""SGLang's native POST /generate through the app, on a scripted engine: SGLang's names in, SGLang's answer out."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from sfllm.config import ServerConfig
from sfllm.frontend.app import create_app
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.sampling_params import StructuredOutput
from test_frontend_app import MODEL, SCRIPT, ScriptedEngine, post, sse_payloads

PROMPT = "The quick brown fox jumps"


def generate(tokenizer: Tokenizer, body: dict[str, Any], engine: ScriptedEngine | None = None) -> httpx.Response:
    engine = engine or ScriptedEngine(tokenizer)
    app = create_app(ServerConfig().frontend(), engine, tokenizer)  # type: ignore[arg-type]

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            # json.dumps escapes an unpaired surrogate, as a client's JSON may carry one
            return await client.post("/generate", content=json.dumps(body),
                                     headers={"content-type": "application/json"})
    return asyncio.run(send())


def test_one_prompt_answers_sglangs_object(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    reply = generate(tokenizer, {"text": "Hi", "sampling_params": {"max_new_tokens": 3, "temperature": 0.5,
                                                                    "top_k": 4, "sampling_seed": 7}}, engine).json()
    ids = tokenizer.encode(SCRIPT, add_special_tokens=False)[:3]
    assert reply["output_ids"] == ids and reply["text"] == tokenizer.decode(ids)
    meta = reply["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 3} and meta["completion_tokens"] == 3
    assert meta["prompt_tokens"] == len(tokenizer.encode("Hi")) and "output_token_logprobs" not in meta
    params = engine.requests[-1].params
    assert (params.max_tokens, params.temperature, params.top_k, params.seed) == (3, 0.5, 4, 7)
    quiet = {"max_new_tokens": 1, "spaces_between_special_tokens": False, "stream_interval": 4}  # as slime sends
    assert generate(tokenizer, {"text": "Hi", "sampling_params": quiet}).status_code == 200


def test_priority_and_a_negative_sampling_seed_are_read_as_on_completions(tokenizer: Tokenizer) -> None:
    """SGLang's top-level integer priority, read as vLLM's (lower runs earlier); any int64 seed, wrapped into the
    worker's [0, 2^63) as on /v1/completions."""
    engine = ScriptedEngine(tokenizer)
    body = {"text": "Hi", "priority": -1, "sampling_params": {"max_new_tokens": 1, "sampling_seed": -3}}
    assert generate(tokenizer, body, engine).status_code == 200
    assert (engine.requests[-1].priority, engine.requests[-1].params.seed) == ("high", 2**63 - 3)
    assert generate(tokenizer, body | {"priority": 3}, engine).status_code == 200
    assert engine.requests[-1].priority == "background"
    reply = generate(tokenizer, body | {"sampling_params": {"sampling_seed": 2**63}}, engine)
    assert reply.status_code == 400 and "seed must be in [-2^63, 2^63)" in reply.json()["error"]["message"]
    assert len(engine.requests) == 2


def test_a_structural_tag_in_sampling_params_constrains_as_response_format_does(tokenizer: Tokenizer) -> None:
    """SGLang's `sampling_params.structural_tag`, the spec's JSON text."""
    engine = ScriptedEngine(tokenizer)
    spec = {"structures": [{"begin": "<f>", "schema": {"type": "integer"}, "end": "</f>"}], "triggers": ["<f"]}
    body = {"text": "Hi", "sampling_params": {"max_new_tokens": 1, "structural_tag": json.dumps(spec)}}
    assert generate(tokenizer, body, engine).status_code == 200
    assert engine.requests[-1].params.structured_output == StructuredOutput.structural_tag(spec)


def test_defaults_batches_samples_and_logprobs(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, max_context_length=512)
    assert "meta_info" in generate(tokenizer, {"input_ids": [1, 2, 3]}, engine).json()
    assert engine.requests[-1].params.max_tokens == 128, "SGLang's default max_new_tokens"
    assert generate(tokenizer, {"input_ids": [1, 2, 3]}).json()["meta_info"]["completion_tokens"] == 125, \
        "clipped to the room the context leaves (128 tokens here)"
    replies = generate(tokenizer, {"input_ids": [[1, 2], [3, 4]], "return_logprob": True, "top_logprobs_num": 2,
                                   "sampling_params": {"max_new_tokens": 2, "n": 2}}).json()
    assert len(replies) == 4 and len({r["meta_info"]["id"] for r in replies}) == 4
    for reply in replies:
        meta = reply["meta_info"]
        assert [entry[1] for entry in meta["output_token_logprobs"]] == reply["output_ids"]
        assert all(len(top) == 2 and top[0][1] == token for top, token in zip(meta["output_top_logprobs"],
                                                                             reply["output_ids"]))


def test_a_stop_string_is_the_matched_stop_and_a_stream_holds_the_text_so_far(tokenizer: Tokenizer) -> None:
    body = {"text": "Hi", "sampling_params": {"max_new_tokens": 20, "stop": ["fox"]}}
    whole = generate(tokenizer, body).json()
    assert whole["meta_info"]["finish_reason"] == {"type": "stop", "matched": "fox"}
    assert whole["text"] == "The quick brown "
    stream = generate(tokenizer, {**body, "stream": True})
    events = stream.text.split("\n\n")
    assert events[-2] == "data: [DONE]"
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    texts = [chunk["text"] for chunk in chunks]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:])), "the text so far"
    assert chunks[-1]["text"] == whole["text"] and chunks[-1]["meta_info"]["finish_reason"]["matched"] == "fox"
    assert all(chunk["index"] == 0 for chunk in chunks)


@pytest.mark.parametrize("body, param, message", [
    ({"text": "x", "input_ids": [1]}, "text", "one of text and input_ids"),
    ({"text": "x", "sampling_params": {"max_new_tokens": 2, "top_a": 1}}, "sampling_params", "['top_a']"),
    ({"text": "x", "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len", "is -2"),
    ({"text": ["Hi", PROMPT], "return_logprob": True, "logprob_start_len": 1, "sampling_params": {"max_new_tokens": 0}},
     "logprob_start_len", "is 1, past a prompt whose last token is at position 0"),
    ({"text": "x", "image_data": "http://x/a.png"}, "image_data", "not supported"),
    ({"text": "x", "sampling_params": {"max_new_tokens": 2, "regex": "a("}}, "regex", "invalid regex"),
    ({"text": "x", "sampling_params": {"max_new_tokens": 2, "structural_tag": "{}"}}, "structural_tag",
     "structural tag's triggers"),
    ({"text": "x", "sampling_params": {"max_new_tokens": 500}}, "prompt", "or max_new_tokens."),
    ({"text": "x", "sampling_params": {"temperature": "0.5"}}, "sampling_params.temperature", "valid number"),
    ({"text": "x", "sampling_params": {"max_new_tokens": 1.5}}, "sampling_params.max_new_tokens", "valid integer"),
    ({"text": "x", "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num", "at most 20"),
    ({"text": "x", "rid": "\ud800"}, "rid", "surrogate"),
    ({"text": ["x"], "sampling_params": [{"max_new_tokens": 1}]}, "sampling_params", ""),
])
def test_what_it_cannot_do_is_a_400_naming_the_field(tokenizer: Tokenizer, body: dict[str, Any], param: str,
                                                      message: str) -> None:
    engine = ScriptedEngine(tokenizer)
    reply = generate(tokenizer, body, engine)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert not engine.requests


def _echo_logprobs(tokenizer: Tokenizer, prompt: str) -> dict[str, Any]:
    """/v1/completions' logprobs of `prompt` alone: lm-eval's loglikelihood request."""
    reply = post(ScriptedEngine(tokenizer), tokenizer, "/v1/completions",
                 {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0}).json()
    return reply["choices"][0]["logprobs"]


@pytest.mark.parametrize("start", [0, 2])
def test_prompt_logprobs_are_completions_echo_ones_from_logprob_start_len_on(tokenizer: Tokenizer, start: int) -> None:
    engine = ScriptedEngine(tokenizer)
    reply = generate(tokenizer, {"text": PROMPT, "return_logprob": True, "logprob_start_len": start,
                                 "top_logprobs_num": 2, "return_text_in_logprobs": True,
                                 "sampling_params": {"max_new_tokens": 0}}, engine).json()
    meta, echo = reply["meta_info"], _echo_logprobs(tokenizer, PROMPT)
    prompt_ids = tokenizer.encode(PROMPT)
    entries, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert len(entries) == len(tops) == len(prompt_ids) - start
    assert [entry[1] for entry in entries] == prompt_ids[start:]
    assert [entry[2] for entry in entries] == echo["tokens"][start:]
    assert entries[0][0] is None and tops[0] is None, "SGLang scores no token at logprob_start_len"
    assert [entry[0] for entry in entries[1:]] == pytest.approx(echo["token_logprobs"][start + 1:])
    for top, echo_top in zip(tops[1:], echo["top_logprobs"][start + 1:]):
        assert top and all(echo_top[text] == pytest.approx(logprob) for logprob, _, text in top)
    assert engine.requests[-1].params.prompt_logprobs == 2
    assert engine.requests[-1].params.max_tokens == 1, "the engine samples one token, the answer shows none"
    assert (reply["text"], reply["output_ids"], meta["completion_tokens"]) == ("", [], 0)
    assert meta["finish_reason"] == {"type": "length", "length": 0} and meta["prompt_tokens"] == len(prompt_ids)
    assert meta["output_token_logprobs"] == [] and meta["output_top_logprobs"] == []


def test_by_default_only_the_last_prompt_token_is_listed_without_text(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    meta = generate(tokenizer, {"text": PROMPT, "return_logprob": True, "sampling_params": {"max_new_tokens": 2}},
                    engine).json()["meta_info"]
    assert meta["input_token_logprobs"] == [[None, tokenizer.encode(PROMPT)[-1], None]]
    assert "input_top_logprobs" not in meta and "output_top_logprobs" not in meta, "SGLang's, top_logprobs_num 0"
    assert [entry[2] for entry in meta["output_token_logprobs"]] == [None, None]
    assert engine.requests[-1].params.prompt_logprobs is None, "no prompt logprobs computed for it"


def test_generation_lists_the_prompts_and_the_outputs_logprobs_streamed_or_not(tokenizer: Tokenizer) -> None:
    body = {"text": PROMPT, "return_logprob": True, "logprob_start_len": 1, "top_logprobs_num": 1,
            "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 3}}
    whole = generate(tokenizer, body).json()
    meta = whole["meta_info"]
    assert len(meta["input_token_logprobs"]) == len(tokenizer.encode(PROMPT)) - 1 and meta["completion_tokens"] == 3
    assert [entry[1] for entry in meta["output_token_logprobs"]] == whole["output_ids"]
    assert [entry[2] for entry in meta["output_token_logprobs"]] == [tokenizer.token_decoded(t)
                                                                     for t in whole["output_ids"]]
    assert [top[0][1] for top in meta["output_top_logprobs"]] == whole["output_ids"]
    chunks = sse_payloads(generate(tokenizer, {**body, "stream": True}))
    assert len(chunks) == 3, "an event a token"
    last = chunks[-1]
    assert (last["text"], last["output_ids"]) == (whole["text"], whole["output_ids"])
    for key in ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs", "output_top_logprobs"):
        assert last["meta_info"][key] == meta[key], key
    assert all(chunk["meta_info"]["input_token_logprobs"] == meta["input_token_logprobs"] for chunk in chunks)


def test_max_new_tokens_0_answers_no_tokens_whole_streamed_and_batched(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer)
    body = {"input_ids": [tokenizer.encode(PROMPT), tokenizer.encode("Hi there")],
            "sampling_params": {"max_new_tokens": 0}}
    replies = generate(tokenizer, body, engine).json()
    chunks = sse_payloads(generate(tokenizer, {**body, "stream": True}))
    assert len(replies) == 2 and sorted(chunk["index"] for chunk in chunks) == [0, 1], "one event a prompt"
    for reply, prompt in zip(replies + sorted(chunks, key=lambda chunk: chunk["index"]), body["input_ids"] * 2):
        meta = reply["meta_info"]
        assert (reply["text"], reply["output_ids"], meta["completion_tokens"]) == ("", [], 0)
        assert meta["finish_reason"] == {"type": "length", "length": 0} and meta["prompt_tokens"] == len(prompt)
        assert "input_token_logprobs" not in meta and meta["e2e_latency"] >= 0
    assert [request.params.max_tokens for request in engine.requests] == [1, 1]
    scored = generate(tokenizer, {**body, "return_logprob": True, "logprob_start_len": 1}).json()
    assert [[entry[1] for entry in reply["meta_info"]["input_token_logprobs"]] for reply in scored] == [
        prompt[1:] for prompt in body["input_ids"]]
