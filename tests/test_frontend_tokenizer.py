"""The frontend's tokenizer, built from the engine's TokenizerSpec without transformers, against transformers."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from transformers import AutoTokenizer

from sfllm.config import ConfigError
from sfllm.frontend.chat_template import ChatTemplateError
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.messages import TokenizerSpec
from sfllm.model_source import resolve_model
from sfllm.model_source.tokenizer_spec import tokenizer_spec

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Bonjour ! ça va ?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "日本語で 🎉 <b>&</b>\n\ttabs"}],
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "<think>\nhm\n</think>\n\nYes."}, {"role": "user", "content": "Why?"}],
]

# In the style of Qwen3's template: whitespace control, a namespace, reversed loops, string methods,
# tojson with options, raise_exception, the generation tag, loop controls, the special-token variables, and
# blocks that rely on trim_blocks and lstrip_blocks.
QWEN_STYLE_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- endif %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {%- if loop.index0 > ns.last_query_index and reasoning %}
            {{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content }}
        {%- endgeneration %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{{- '<|im_start|>meta\\n' + {'turns': messages|length, 'last': messages[-1].content}|tojson(indent=1) }}
{{- (messages[-1]|tojson(ensure_ascii=True, sort_keys=True)) + eos_token + '\\n' -}}
{% if add_generation_prompt %}
    {% if messages|length > 1 %}
<|im_start|>assistant
    {% else %}
<|im_start|>assistant (first turn)
    {% endif %}
{% endif %}
"""


@pytest.fixture(scope="module")
def smollm_hf_tokenizer(smollm_source) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(smollm_source.tokenizer_folder)


@pytest.fixture(scope="module")
def qwen_source(tmp_path_factory: pytest.TempPathFactory):
    return resolve_model("qwen3-0.6b", load_format="dummy", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def qwen_style_spec(qwen_source) -> TokenizerSpec:
    return msgspec.structs.replace(tokenizer_spec(qwen_source), chat_template=QWEN_STYLE_TEMPLATE)


@pytest.fixture(scope="module")
def qwen_hf_tokenizer(qwen_source) -> AutoTokenizer:
    return AutoTokenizer.from_pretrained(qwen_source.tokenizer_folder)


def transformers_ids(hf_tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool,
                     chat_template: str | None = None) -> list[int]:
    return hf_tokenizer.apply_chat_template(messages, chat_template=chat_template,
                                            add_generation_prompt=add_generation_prompt)["input_ids"]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_default_model_chat_prompts_equal_transformers(tokenizer: Tokenizer, smollm_hf_tokenizer,
                                                       messages: list[dict[str, str]],
                                                       add_generation_prompt: bool) -> None:
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == transformers_ids(smollm_hf_tokenizer, messages, add_generation_prompt)


@pytest.mark.parametrize("text", ["Hello, world!", "  spaces\n\ttabs 日本語 🎉", "<|im_start|>user\nhi<|im_end|>",
                                  "1234567 digits"])
def test_default_model_prompts_and_text_equal_transformers(tokenizer: Tokenizer, smollm_hf_tokenizer,
                                                           text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == smollm_hf_tokenizer.encode(text)
    for skip_special_tokens in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens) == smollm_hf_tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_qwen_style_template_equals_transformers(qwen_style_spec: TokenizerSpec, qwen_hf_tokenizer,
                                                 messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    ours = Tokenizer(qwen_style_spec).apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == transformers_ids(qwen_hf_tokenizer, messages, add_generation_prompt, QWEN_STYLE_TEMPLATE)
    assert "<|im_end|>" in qwen_style_spec.special_tokens.values(), "the eos_token variable is the dummy tokenizer's"


def test_an_operators_chat_template_replaces_the_models(smollm_tokenizer_spec: TokenizerSpec, tmp_path: Path) -> None:
    """vLLM's --chat-template: a file's path or the template itself, in the tokenizer the engine hands frontends
    (and LLM uses); one that cannot serve is an error before anything starts."""
    from sfllm.config import load_config
    from sfllm.engine.engine_process import _model_for_frontends
    from sfllm.model_source.chat_template_override import with_chat_template
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    path = tmp_path / "plain.jinja"
    path.write_text(template)
    for given in (str(path), template):
        spec = with_chat_template(smollm_tokenizer_spec, given)
        assert Tokenizer(spec).chat_template.render([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"
    assert with_chat_template(smollm_tokenizer_spec, None) is smollm_tokenizer_spec
    engine_spec, _, grammars = _model_for_frontends(load_config(environ={}, chat_template=str(path)).engine())
    grammars.result()
    assert engine_spec.chat_template == template and engine_spec.tokenizer_json == smollm_tokenizer_spec.tokenizer_json
    with pytest.raises(ValueError, match="the chat template given inline cannot serve: the chat template does not "
                                         "compile"):
        with_chat_template(smollm_tokenizer_spec, "{% for %}")
    with pytest.raises(ValueError, match="cannot read the chat template .*none.jinja"):
        with_chat_template(smollm_tokenizer_spec, str(tmp_path / "none.jinja"))
    empty = tmp_path / "empty.jinja"
    empty.write_text("\n")
    for given, message in ((str(tmp_path / "none.jinja"), "chat_template: cannot read the chat template"),
                           (str(empty), f"chat_template: the chat template in {empty} is empty"),
                           ("{% for %}", "chat_template: the chat template given inline cannot serve")):
        with pytest.raises(ConfigError, match=message):  # before anything starts
            load_config(environ={}, chat_template=given)


def test_template_errors_are_chat_template_errors(qwen_style_spec: TokenizerSpec) -> None:
    spec = qwen_style_spec
    with pytest.raises(ChatTemplateError, match="unknown role: tool"):
        Tokenizer(spec).apply_chat_template([{"role": "tool", "content": "x"}])
    broken = Tokenizer(msgspec.structs.replace(spec, chat_template="{% for %}"))
    assert broken.encode("still encodes") == Tokenizer(spec).encode("still encodes")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(msgspec.structs.replace(spec, chat_template=None)).apply_chat_template([{"role": "user",
                                                                                          "content": "x"}])


def test_a_model_with_named_templates_chats_with_the_default_one(smollm_source, tmp_path: Path) -> None:
    folder = tmp_path / "named"
    folder.mkdir()
    for file in smollm_source.tokenizer_folder.iterdir():
        if file.name.startswith("tokenizer") or file.name == "config.json":
            (folder / file.name).write_bytes(file.read_bytes())
    hf_tokenizer = AutoTokenizer.from_pretrained(smollm_source.tokenizer_folder)
    hf_tokenizer.chat_template = {"default": "{{ messages[0]['content'] }}!", "tool_use": "tools"}
    hf_tokenizer.save_pretrained(folder)
    spec = tokenizer_spec(resolve_model(str(folder), load_format="dummy"))
    assert Tokenizer(spec).apply_chat_template([{"role": "user", "content": "hi"}]) == hf_tokenizer.encode("hi!")


# The end of Qwen3's template: a closed, empty reasoning block when the request turns thinking off.
THINKING_SWITCH_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


def rendered_text_equal_to_transformers(spec: TokenizerSpec, hf_tokenizer, template: str, ours: dict[str, Any],
                                        theirs: dict[str, Any]) -> str:
    """The first conversation rendered by `template` with our options `ours` and transformers' `theirs`: the same
    ids; returns their text."""
    tokenizer = Tokenizer(msgspec.structs.replace(spec, chat_template=template))
    ids = tokenizer.apply_chat_template(CONVERSATIONS[0], **ours)
    assert ids == hf_tokenizer.apply_chat_template(CONVERSATIONS[0], chat_template=template, add_generation_prompt=True,
                                                   **theirs)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("variables", [None, {"enable_thinking": False}, {"enable_thinking": True}])
def test_request_variables_reach_the_template_as_transformers_passes_them(qwen_style_spec: TokenizerSpec,
                                                                          qwen_hf_tokenizer,
                                                                          variables: dict | None) -> None:
    text = rendered_text_equal_to_transformers(qwen_style_spec, qwen_hf_tokenizer, THINKING_SWITCH_TEMPLATE,
                                               {"variables": variables}, variables or {})
    assert ("</think>" in text) == (variables == {"enable_thinking": False})


DOCUMENTS_TEMPLATE = """
{%- if documents %}{{ '<|im_start|>system\nSources:\n' }}
{%- for document in documents %}{{ loop.index }}. {{ document.title }}: {{ document.text }}\n{% endfor %}
{{- '<|im_end|>\n' }}{%- endif %}
{%- for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
"""


@pytest.mark.parametrize("documents", [None, [{"title": "Paris", "text": "The capital of France."},
                                              {"title": "Lyon", "text": "A city on the Rhône."}]])
def test_documents_reach_a_retrieval_template_as_transformers_passes_them(qwen_style_spec: TokenizerSpec,
                                                                          qwen_hf_tokenizer,
                                                                          documents: list | None) -> None:
    """vLLM's chat `documents`, transformers' argument of that name: the sources a RAG template renders."""
    text = rendered_text_equal_to_transformers(qwen_style_spec, qwen_hf_tokenizer, DOCUMENTS_TEMPLATE,
                                               {"documents": documents}, {"documents": documents})
    assert ("Rhône" in text) == (documents is not None)


@pytest.mark.parametrize("last", ["The capital of France is", "The capital is ", "  Paris, of course.\n"])
def test_continue_final_message_equals_transformers(tokenizer: Tokenizer, smollm_hf_tokenizer, last: str) -> None:
    messages = CONVERSATIONS[0] + [{"role": "assistant", "content": last}]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert ours == smollm_hf_tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                                           continue_final_message=True)["input_ids"]
    text = tokenizer.decode(ours, skip_special_tokens=False)
    assert text.rstrip().endswith(last.strip()) and text.count("<|im_end|>") == 2, "the assistant's turn stays open"


def test_template_options_that_cannot_hold_are_chat_template_errors(tokenizer: Tokenizer,
                                                                    smollm_tokenizer_spec: TokenizerSpec) -> None:
    messages = CONVERSATIONS[0] + [{"role": "assistant", "content": "Paris"}]
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="may not set add_generation_prompt, messages"):
        tokenizer.apply_chat_template(messages, variables={"messages": [], "add_generation_prompt": False, "x": 1})
    with pytest.raises(ChatTemplateError, match="with text to continue"):
        tokenizer.apply_chat_template(messages[:1] + [{"role": "assistant", "content": " "}],
                                      add_generation_prompt=False, continue_final_message=True)
    shouting = Tokenizer(msgspec.structs.replace(smollm_tokenizer_spec, chat_template=(
        "{% for m in messages %}{{ m.content | upper }}\n{% endfor %}")))
    with pytest.raises(ChatTemplateError, match="cannot be continued"):
        shouting.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
