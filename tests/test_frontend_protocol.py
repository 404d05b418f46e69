"""OpenAI request bodies to SamplingParams, and the checks every request passes."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from sfllm.frontend.errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from sfllm.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from sfllm.frontend.openai_responses import ChatDelta
from sfllm.frontend.request_checks import check_model, check_prompt_token_ids, resolve_max_tokens, resolve_priority
from sfllm.frontend.tools import ChatTools
from sfllm.sampling_params import InvalidSamplingParams, SamplingParams

MESSAGES = [{"role": "user", "content": "Hi"}]


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"prompt": "Hi", **fields})


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def test_every_sampling_field_reaches_sampling_params() -> None:
    request = completion(max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, presence_penalty=0.5,
                         frequency_penalty=-0.5, repetition_penalty=1.2, seed=11, n=3, stop="###",
                         stop_token_ids=[5, 6], ignore_eos=True, include_stop_str_in_output=True,
                         skip_special_tokens=False, logprobs=2)
    params = request.sampling_params(request.requested_max_tokens(), request.logprobs)
    assert params == SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05,
                                    presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, seed=11,
                                    n=3, stop=["###"], stop_token_ids=[5, 6], ignore_eos=True,
                                    include_stop_str_in_output=True, logprobs=2, skip_special_tokens=False)


def test_absent_and_null_fields_take_openai_defaults() -> None:
    request = completion(temperature=None, top_p=None, n=None, stop=None, seed=None)
    assert request.sampling_params(16, None) == SamplingParams(max_tokens=16)
    assert request.requested_max_tokens() is None
    assert not request.stream and not request.include_usage_in_stream()


def test_top_k_zero_means_off() -> None:
    assert completion(top_k=0).sampling_params(16, None).top_k == -1


def test_stop_list_is_kept_in_order() -> None:
    assert completion(stop=["a", "bb"]).sampling_params(16, None).stop == ["a", "bb"]


def test_max_tokens_aliases() -> None:
    assert completion(max_new_tokens=9).requested_max_tokens() == 9
    assert completion(max_tokens=3, max_new_tokens=9).requested_max_tokens() == 3
    assert chat(max_completion_tokens=5, max_tokens=3).requested_max_tokens() == 5
    assert chat(max_tokens=3).requested_max_tokens() == 3


@pytest.mark.parametrize(("prompt", "expected"), [
    ("Hi", ["Hi"]),
    (["Hi", "Yo"], ["Hi", "Yo"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_prompt_forms(prompt: object, expected: list[object]) -> None:
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == expected


@pytest.mark.parametrize("prompt", [5, [1, "a"], [[1], "a"], {"text": "x"}, None])
def test_malformed_prompts_are_rejected(prompt: object) -> None:
    with pytest.raises(ValidationError, match="prompt must be a string, a list of strings"):
        CompletionRequest.model_validate({"prompt": prompt})


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", "hot"), ("temperature", [1]), ("stream", "yes"), ("max_tokens", 1.5), ("n", True),
    ("stop", 5), ("seed", "7"), ("priority", "urgent"), ("priority", True), ("priority", 1.0), ("priority", 2**63),
    ("logprobs", "3"),
])
def test_wrong_types_are_rejected_with_the_field_named(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as error:
        completion(**{field: value})
    assert all(e["loc"][0] == field for e in error.value.errors())


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options"),
])
def test_out_of_range_values_name_the_param(fields: dict[str, object], param: str) -> None:
    request = completion(**fields)
    with pytest.raises(InvalidSamplingParams) as error:
        request.sampling_params(16, request.logprobs)
    assert error.value.param == param


def test_any_int64_seed_is_valid_and_a_seed_of_another_type_is_named() -> None:
    for seed in (-2**63, -1, 0, 2**63 - 1):
        assert completion(seed=seed).sampling_params(16, None).seed == seed
    for seed in (True, 1.5, "7"):
        with pytest.raises(InvalidSamplingParams) as error:
            SamplingParams(seed=seed).validate()  # the offline API's values, which msgspec does not check
        assert error.value.param == "seed"


def test_empty_stream_options_are_no_option() -> None:
    """vLLM's reading: `{}` sets nothing, so it needs no stream and asks for no usage."""
    request = completion(stream_options={})
    assert request.sampling_params(16, None) and not request.include_usage_in_stream()
    assert completion(stream=True, stream_options={"continuous_usage_stats": True}).usage_in_every_chunk() is False


def test_max_tokens_below_one_is_rejected() -> None:
    with pytest.raises(InvalidSamplingParams) as error:
        completion().sampling_params(0, None)
    assert error.value.param == "max_tokens"


def test_chat_logprobs() -> None:
    assert chat().num_logprobs() is None
    assert chat(logprobs=True).num_logprobs() == 0
    assert chat(logprobs=True, top_logprobs=5).num_logprobs() == 5
    for fields in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(InvalidSamplingParams) as error:
            chat(**fields).num_logprobs()
        assert error.value.param == "top_logprobs"


def test_chat_messages_become_template_messages() -> None:
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
    ]})
    assert ChatTools(request).template_messages(request.messages, template_takes_tools=False) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello\nthere"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize("messages", [
    [],
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"content": "no role"}],
])
def test_unusable_messages_are_rejected(messages: list[object]) -> None:
    with pytest.raises(ValidationError) as error:
        ChatCompletionRequest.model_validate({"messages": messages})
    assert error.value.errors()[0]["loc"][0] == "messages"


def test_chat_delta_carries_only_what_changed() -> None:
    assert ChatDelta(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}
    assert ChatDelta(content="x").model_dump() == {"content": "x"}
    assert ChatDelta().model_dump_json() == "{}"


def test_model_must_be_the_served_one_or_absent() -> None:
    check_model(None, "served")
    check_model("served", "served")
    with pytest.raises(ModelNotFoundError) as error:
        check_model("other", "served")
    assert error.value.status_code == 404 and "other" in error.value.message


def test_priority_from_body_or_header() -> None:
    assert resolve_priority(None, None) == "normal"
    assert resolve_priority(None, " Background ") == "background"
    assert resolve_priority("high", "background") == "high"
    # vLLM's integer: lower runs earlier
    assert [resolve_priority(value, "high") for value in (-2**63, -1, 0, 1, 2**63 - 1)] == [
        "high", "high", "normal", "background", "background"]
    with pytest.raises(InvalidRequestError) as error:
        resolve_priority(None, "urgent")
    assert error.value.param == "X-Priority"


def test_max_tokens_defaults_and_context_limit() -> None:
    assert resolve_max_tokens(None, 16, num_prompt_tokens=10, max_context_length=100, param="prompt") == 16
    assert resolve_max_tokens(None, 16, num_prompt_tokens=90, max_context_length=100, param="prompt") == 10
    assert resolve_max_tokens(None, None, num_prompt_tokens=10, max_context_length=100, param="messages") == 90
    assert resolve_max_tokens(90, None, num_prompt_tokens=10, max_context_length=100, param="messages") == 90
    with pytest.raises(ContextLengthExceededError) as error:
        resolve_max_tokens(91, None, num_prompt_tokens=10, max_context_length=100, param="messages")
    assert error.value.status_code == 400 and error.value.param == "messages"
    assert all(number in error.value.message for number in ("100", "101", "10 in the prompt", "91"))
    with pytest.raises(ContextLengthExceededError) as error:
        resolve_max_tokens(None, 16, num_prompt_tokens=100, max_context_length=100, param="prompt")
    assert "100 tokens" in error.value.message


def test_prompt_token_ids_must_be_in_the_vocabulary() -> None:
    check_prompt_token_ids([0, 99], vocab_size=100, param="prompt")
    for token_ids in ([], [100], [-1]):
        with pytest.raises(InvalidRequestError) as error:
            check_prompt_token_ids(token_ids, vocab_size=100, param="prompt")
        assert error.value.param == "prompt"
