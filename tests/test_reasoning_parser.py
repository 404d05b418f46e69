"""The reasoning parser on whole and split streams, and a chat answer's `reasoning_content` through the app."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from sfllm.config import ConfigError, ServerConfig, load_config
from sfllm.frontend.app import create_app
from sfllm.frontend.reasoning_parser import ReasoningParser
from sfllm.frontend.tokenizer import Tokenizer
from test_frontend_app import ScriptedEngine, sse_payloads

QWEN3_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
QWEN3_NO_THINKING = QWEN3_PROMPT + "<think>\n\n</think>\n\n"
THINKING_TEMPLATE = QWEN3_PROMPT + "<think>\n"  # Qwen3 "thinking" releases, DeepSeek R1's newer templates


def split(pieces: list[str], name: str = "qwen3", prompt_tail: str = QWEN3_PROMPT,
          constrained: bool = False) -> tuple[str, str]:
    parser = ReasoningParser(name, prompt_tail, constrained)
    reasoning = content = ""
    for part in [parser.feed(piece) for piece in pieces] + [parser.finish()]:
        reasoning += part.reasoning
        content += part.content
    return reasoning, content


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("name, prompt_tail, text, reasoning, content", [
    ("qwen3", QWEN3_PROMPT, "<think>\nPlan: add.\n</think>\n\n2 + 2 = 4", "\nPlan: add.\n", "\n\n2 + 2 = 4"),
    ("qwen3", QWEN3_PROMPT, "2 + 2 = 4 <think>not a thought</think>", "", "2 + 2 = 4 <think>not a thought</think>"),
    ("qwen3", QWEN3_PROMPT, "<thinking> is a tag", "", "<thinking> is a tag"),
    ("qwen3", QWEN3_PROMPT, "<thi", "", "<thi"),
    ("qwen3", QWEN3_PROMPT, "<think>cut short by max_tokens </thi", "cut short by max_tokens </thi", ""),
    ("qwen3", QWEN3_NO_THINKING, "<think>x</think>y", "x", "y"),
    ("qwen3", QWEN3_NO_THINKING, "The answer.", "", "The answer."),
    ("qwen3", THINKING_TEMPLATE, "Plan.\n</think>\n\nDone.", "Plan.\n", "\n\nDone."),
    ("deepseek_r1", QWEN3_PROMPT, "Plan.</think>Done.", "Plan.", "Done."),
    ("deepseek_r1", QWEN3_PROMPT, "\n<think>Plan.</think>Done.", "Plan.", "Done."),
    ("deepseek_r1", QWEN3_PROMPT, "never closed", "never closed", ""),
    ("qwen3", "<|im_start|>user\nWhat does <think> mean?<|im_end|>\n<|im_start|>assistant\n", "A tag.", "",
     "A tag."),
])
def test_every_split_of_an_answer_gives_the_whole_answers_parts(name: str, prompt_tail: str, text: str,
                                                                reasoning: str, content: str) -> None:
    assert split([text], name, prompt_tail) == (reasoning, content)
    assert split(list(text), name, prompt_tail) == (reasoning, content), "a character at a time"
    rng = random.Random(text)
    for _ in range(50):
        assert split(random_pieces(text, rng), name, prompt_tail) == (reasoning, content)


@pytest.mark.parametrize("name, prompt_tail", [("deepseek_r1", QWEN3_PROMPT), ("qwen3", THINKING_TEMPLATE)])
def test_a_grammar_written_answer_is_content_unless_it_opens_a_thought(name: str, prompt_tail: str) -> None:
    """A response_format or forced tool call constrains the answer from its first token: no implicit thought."""
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert split([call], name, prompt_tail, constrained=True) == ("", call)
    assert split(["<think>a</think>{}"], name, prompt_tail, constrained=True) == ("a", "{}")


def test_an_unknown_parser_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="reasoning_parser must be one of None, qwen3, deepseek_r1"):
        load_config(environ={}, reasoning_parser="qwen")


def chat(tokenizer: Tokenizer, script: str, body: dict, reasoning_parser: str | None = "qwen3") -> httpx.Response:
    engine = ScriptedEngine(tokenizer, max_context_length=512, script=script)
    config = ServerConfig(reasoning_parser=reasoning_parser).frontend()
    app = create_app(config, engine, tokenizer)  # type: ignore[arg-type]

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "2 + 2?"}], **body})
    return asyncio.run(send())


ANSWER = "<think>\nTwo and two make four.\n</think>\n\nIt is 4."


def test_a_chat_answer_splits_into_reasoning_and_content_streamed_or_not(tokenizer: Tokenizer) -> None:
    num_tokens = len(tokenizer.encode(ANSWER))
    whole = chat(tokenizer, ANSWER, {"max_tokens": num_tokens}).json()["choices"][0]
    assert whole["message"]["reasoning_content"] == "\nTwo and two make four.\n"
    assert whole["message"]["content"] == "\n\nIt is 4." and whole["finish_reason"] == "length"
    assert whole["message"]["reasoning"] == whole["message"]["reasoning_content"], "current vLLM's name too"
    stream = chat(tokenizer, ANSWER, {"max_tokens": num_tokens, "stream": True})
    deltas = [choice["delta"] for chunk in sse_payloads(stream) for choice in chunk["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == whole["message"]["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == whole["message"]["content"]
    assert sum(1 for d in deltas if d.get("reasoning_content")) > 1, "the reasoning streams as it comes"
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    left_out = chat(tokenizer, ANSWER, {"max_tokens": num_tokens, "include_reasoning": False}).json()
    assert left_out["choices"][0]["message"] == {"role": "assistant", "content": "\n\nIt is 4."}
    unparsed = chat(tokenizer, ANSWER, {"max_tokens": num_tokens}, reasoning_parser=None).json()
    assert unparsed["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}, "off by default"
    assert "reasoning" not in json.dumps(chat(tokenizer, "It is 4.", {"max_tokens": 3}).json())


def test_an_answer_cut_inside_its_thought_has_null_content(tokenizer: Tokenizer) -> None:
    """As vLLM answers: `content` is null, not "", when the answer held only a thought."""
    message = chat(tokenizer, ANSWER, {"max_tokens": 4}).json()["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"], message
    left_out = chat(tokenizer, ANSWER, {"max_tokens": 4, "include_reasoning": False}).json()
    assert left_out["choices"][0]["message"] == {"role": "assistant", "content": None}


def test_tool_calls_are_read_from_the_text_after_the_reasoning(tokenizer: Tokenizer) -> None:
    answer = ('<think>The weather tool fits. <tool_call> is how I call it.</think>\n<tool_call>\n'
              '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = chat(tokenizer, answer, {"max_tokens": len(tokenizer.encode(answer)), "tools": tools}).json()
    message = reply["choices"][0]["message"]
    assert message["reasoning_content"] == "The weather tool fits. <tool_call> is how I call it."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"})]
    assert message["content"] is None


def test_an_earlier_answers_reasoning_reaches_the_template(smollm_tokenizer_spec) -> None:
    import msgspec
    template = ("{% for m in messages %}{{ m['role'] }}: {% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
                "</think>{% endif %}{{ m['content'] }}\n{% endfor %}assistant:")
    tokenizer = Tokenizer(msgspec.structs.replace(smollm_tokenizer_spec, chat_template=template))
    engine = ScriptedEngine(tokenizer)
    app = create_app(ServerConfig(reasoning_parser="qwen3").frontend(), engine, tokenizer)  # type: ignore[arg-type]
    for field in ("reasoning_content", "reasoning"):  # SGLang's name and current vLLM's
        messages = [{"role": "user", "content": "2 + 2?"},
                    {"role": "assistant", "content": "4", field: "Two and two."},
                    {"role": "user", "content": "And 3 + 3?"}]

        async def send() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert asyncio.run(send()).status_code == 200
        assert tokenizer.decode(engine.requests[-1].prompt_token_ids) == (
            "user: 2 + 2?\nassistant: <think>Two and two.</think>4\nuser: And 3 + 3?\nassistant:"), field


def test_a_forced_tool_call_under_deepseek_r1_is_a_tool_call(tokenizer: Tokenizer) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = chat(tokenizer, call, {"max_tokens": len(tokenizer.encode(call)), "tools": tools,
                                   "tool_choice": "required"}, reasoning_parser="deepseek_r1").json()
    message = reply["choices"][0]["message"]
    assert "reasoning_content" not in message and message["tool_calls"][0]["function"]["name"] == "get_weather"


def thinking_tokenizer(spec) -> Tokenizer:
    """SmolLM2's tokenizer with <think> and </think> added as single tokens (as Qwen3's vocabulary has them), and a
    template that closes the thought in the prompt when told `enable_thinking=False`, as Qwen3's does."""
    import msgspec
    backend = json.loads(spec.tokenizer_json)
    for offset, tag in enumerate(("<think>", "</think>")):
        backend["added_tokens"].append({"id": spec.vocab_size + offset, "content": tag, "single_word": False,
                                        "lstrip": False, "rstrip": False, "normalized": False, "special": False})
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
                "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}")
    return Tokenizer(msgspec.structs.replace(spec, tokenizer_json=json.dumps(backend), chat_template=template,
                                             vocab_size=spec.vocab_size + 2))


@pytest.mark.parametrize("parser, template_options, opened", [
    ("qwen3", {}, False), ("deepseek_r1", {}, True),
    ("qwen3", {"chat_template_kwargs": {"enable_thinking": False}}, None)])
def test_a_constrained_answer_thinks_first_where_the_tags_are_tokens(smollm_tokenizer_spec, parser: str,
                                                                     template_options: dict, opened) -> None:
    """With a reasoning parser, response_format (and a forced tool call) constrains the answer after the thought,
    as vLLM does: the engine is told the thought's tokens (the scheduler's GrammarAfterThought), and the parser
    reads the thought as reasoning. A prompt that closed the thought constrains from the first token."""
    tokenizer = thinking_tokenizer(smollm_tokenizer_spec)
    think, end_think = smollm_tokenizer_spec.vocab_size, smollm_tokenizer_spec.vocab_size + 1
    answer = '<think>A number.</think>{"n": 4}' if opened is not None else '{"n": 4}'
    engine = ScriptedEngine(tokenizer, max_context_length=512, script=answer)
    app = create_app(ServerConfig(reasoning_parser=parser).frontend(), engine, tokenizer)  # type: ignore[arg-type]

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": len(tokenizer.encode(answer)),
                "response_format": {"type": "json_object"}, **template_options})
    message = asyncio.run(send()).json()["choices"][0]["message"]
    after_thought = engine.requests[-1].params.structured_output.after_thought
    if opened is None:
        assert after_thought is None
        assert message == {"role": "assistant", "content": answer}
    else:
        assert (after_thought.start, after_thought.end, after_thought.opened) == (think, end_think, opened)
        assert message["reasoning_content"] == "A number." and message["content"] == '{"n": 4}', message


def test_without_single_token_tags_the_grammar_constrains_from_the_first_token(tokenizer: Tokenizer) -> None:
    """SmolLM2 spells <think> in several tokens: the engine is not told of a thought (the grammar could not wait
    for a tag of several tokens); an answer the grammar wrote is content."""
    engine = ScriptedEngine(tokenizer, max_context_length=512, script='{"n": 4}')
    config = ServerConfig(reasoning_parser="deepseek_r1").frontend()
    app = create_app(config, engine, tokenizer)  # type: ignore[arg-type]

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "2 + 2?"}], "max_tokens": len(tokenizer.encode('{"n": 4}')),
                "response_format": {"type": "json_object"}})
    message = asyncio.run(send()).json()["choices"][0]["message"]
    assert engine.requests[-1].params.structured_output.after_thought is None
    assert message == {"role": "assistant", "content": '{"n": 4}'}


@pytest.mark.parametrize("name, continued, text, reasoning, content", [
    # the final message stopped inside its thought: the answer goes on thinking, then answers
    ("qwen3", "<think>\nTwo and", " two.</think>It is 4.", " two.", "It is 4."),
    ("deepseek_r1", "<think>Two and", " two.</think>It is 4.", " two.", "It is 4."),
    # no tags: a prefilled answer, for R1 too (whose thoughts need no <think>)
    ("deepseek_r1", '{"n": ', '4}', "", '4}'),
    # past its thought, or plain text: all content, a <think> in it included
    ("qwen3", "<think>Two.</think>It", " is <think>4.", "", " is <think>4."),
    ("qwen3", "It", " is 4.", "", " is 4."),
    ("deepseek_r1", "<think>Two.</think>It", " is 4.", "", " is 4."),
])
def test_a_continued_final_message_goes_on_in_the_part_it_stopped_in(name: str, continued: str, text: str,
                                                                     reasoning: str, content: str) -> None:
    for pieces in ([text], list(text)):
        parser = ReasoningParser(name, continued[-8:], continued=continued)
        parts = [parser.feed(piece) for piece in pieces] + [parser.finish()]
        assert ("".join(p.reasoning for p in parts), "".join(p.content for p in parts)) == (reasoning, content)


def test_a_continued_thought_is_free_before_the_grammar(smollm_tokenizer_spec) -> None:
    """continue_final_message mid-thought with response_format: the engine is told the output starts in the thought
    (a message continued past it is constrained from its first token)."""
    tokenizer = thinking_tokenizer(smollm_tokenizer_spec)
    engine = ScriptedEngine(tokenizer, max_context_length=512, script=' two.</think>{"n": 4}')
    app = create_app(ServerConfig(reasoning_parser="qwen3").frontend(), engine, tokenizer)  # type: ignore[arg-type]

    async def send(final: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": final}],
                "continue_final_message": True, "max_tokens": len(tokenizer.encode(' two.</think>{"n": 4}')),
                "response_format": {"type": "json_object"}})
    message = asyncio.run(send("<think>Two and")).json()["choices"][0]["message"]
    assert engine.requests[-1].params.structured_output.after_thought.opened is True
    assert message["reasoning_content"] == " two." and message["content"] == '{"n": 4}', message
    asyncio.run(send("<think>Two.</think>"))
    assert engine.requests[-1].params.structured_output.after_thought is None
