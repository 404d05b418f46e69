"""The offline API: `LLM(model=...).generate(prompts, params)`.

It drives the same EngineCore, Scheduler and ModelRunner as the server, with the worker
in this process instead of behind a socket, and the frontend's text path (tokenizer,
fan-out to n choices, stop strings, detokenizer: sfllm/frontend/choices.py).
"""
from __future__ import annotations

import collections
import itertools
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from tqdm import tqdm

from sfllm.config import load_config
from sfllm.engine.engine_core import EngineCore
from sfllm.frontend.choices import ChoiceDecoder, plan_choices
from sfllm.frontend.logprobs_format import by_token
from sfllm.frontend.openai_protocol import ChatTextPart, joined_text
from sfllm.frontend.tool_protocol import ChatTool
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.gc_pauses import full_collections_deferred
from sfllm.messages import GenerateRequest, priority_class
from sfllm.model_source import resolve_model
from sfllm.model_source.chat_template_override import with_chat_template
from sfllm.model_source.generation_defaults import sampling_defaults
from sfllm.model_source.resolve import resolve_cache_dir
from sfllm.model_source.tokenizer_spec import tokenizer_spec, transformers_tokenizer
from sfllm.offline_outputs import CompletionOutput, GenerationResult
from sfllm.sampling_params import SamplingParams, StructuredOutput
from sfllm.scheduler.waiting_queue import QUEUE_FULL_STATUS
from sfllm.worker.inprocess_worker import InProcessWorker


class GenerationError(RuntimeError):
    pass


class InvalidPrompt(GenerationError, ValueError):
    """A prompt the engine refuses (too long for the context, empty, a token id outside the vocabulary): a
    ValueError, as vLLM raises it."""


Prompt = str | list[int] | Mapping[str, Any]
# one for every prompt of a call, or vLLM's list of one a prompt; a class name or vLLM's integer (lower runs earlier)
PriorityArg = str | int | list[str | int] | None


def _prompt_of(prompt: Prompt) -> str | list[int]:
    """A text or token ids, from any form generate takes."""
    if isinstance(prompt, Mapping):
        # vLLM's TokensPrompt / TextPrompt, or transformers' encoding (apply_chat_template's with transformers 5)
        key = next((k for k in ("prompt_token_ids", "input_ids", "prompt") if k in prompt), None)
        if key is None:
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}")
        prompt = prompt[key]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(type(t) is int for t in prompt):
        return prompt  # the common case, checked 15x faster than below (46 ms for the offline bench's 146k ids)
    if isinstance(prompt, list) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]  # numpy's too
    raise TypeError(f"a prompt is a str, a list of token ids or a dict of either; got {type(prompt).__name__}")


def _cache_salt_of(prompt: Prompt) -> str | None:
    """vLLM's `cache_salt` of a prompt dict: only prompts of the same salt share cached prefixes."""
    salt = prompt.get("cache_salt") if isinstance(prompt, Mapping) else None
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"a prompt's cache_salt is a non-empty string; got {salt!r}")
    return salt


def _priority_classes(priority: PriorityArg, num_prompts: int) -> list[str]:
    """Each prompt's scheduling class (None: normal, as vLLM's default 0)."""
    if isinstance(priority, (list, tuple)):
        if len(priority) != num_prompts:
            raise ValueError(f"{len(priority)} priorities for {num_prompts} prompts: give one a prompt, or one "
                             "for all of them")
        return [priority_class(each) for each in priority]
    return [priority_class("normal" if priority is None else priority)] * num_prompts


def _text_message(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message with its content parts (OpenAI's `[{"type": "text", "text": ...}]`) checked and joined as the
    server checks and joins them (a ValueError otherwise)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": joined_text([ChatTextPart.model_validate(part) for part in content])}


@dataclass
class _Tracked:
    """One choice in flight, and where its text goes."""
    decoder: ChoiceDecoder
    result: GenerationResult
    output: CompletionOutput
    token_text: Callable[[int], str] | None  # a logprob's decoded_token (None with detokenize=False, as vLLM)


class LLM:
    def __init__(self, model: str | None = None, **config: Any) -> None:
        """`model`: a dummy preset name, the bundled model's name, a .gguf file or a HuggingFace folder (default
        DEFAULT_MODEL; SGLang's `model_path=` too); `config`: settings by sfllm's, vLLM's or SGLang's names."""
        self.config = load_config(environ={}, **({} if model is None else {"model": model}), **config)
        self.source = resolve_model(self.config.model, self.config.load_format, self.config.cache_dir)
        model_spec = tokenizer_spec(self.source, resolve_cache_dir(self.config.cache_dir))
        self._tokenizer_spec = with_chat_template(model_spec, self.config.chat_template)
        self.sampling_defaults = sampling_defaults(self.config.generation_config, self.source.config_folder,
                                                   self.config.override_generation_config)
        self.tokenizer = Tokenizer(self._tokenizer_spec)
        self.engine = EngineCore(self.config.scheduler(), InProcessWorker(self.config.worker(), self.source),
                                 self._tokenizer_spec)
        self._ids = itertools.count()
        self._hf_tokenizer: Any = None

    @property
    def max_context_length(self) -> int:
        return self.engine.worker.info.max_context_length

    def get_tokenizer(self) -> Any:
        """vLLM's: the model's tokenizer as transformers' class, for code that calls its `apply_chat_template`,
        `encode` or `decode` (made once, from what sfllm's own tokenizer reads, so the two give the same ids)."""
        if self._hf_tokenizer is None:
            self._hf_tokenizer = transformers_tokenizer(self._tokenizer_spec, self.source.config.eos_token_ids,
                                                        self.config.model, self.max_context_length)
        return self._hf_tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: what `generate` and `chat` sample with when given no SamplingParams: sfllm's defaults, with the
        values the model's generation_config.json recommends (the `generation_config` setting)."""
        return SamplingParams(**self.sampling_defaults.given())

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 priority: PriorityArg = "normal", use_tqdm: bool = False) -> list[GenerationResult]:
        """A prompt is a text, a list of token ids, vLLM's `{"prompt": text}` / `{"prompt_token_ids": ids}` (with its
        `cache_salt`: only prompts of one salt share cached prefixes), or transformers' encoding of one
        (`{"input_ids": ids, ...}`). `priority`: high, normal or background, or vLLM's integer (below 0 high, 0
        normal, above 0 background); one for every prompt, or a list of one a prompt."""
        if isinstance(prompts, (str, Mapping)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        salts = [_cache_salt_of(p) for p in prompts]
        prompts = [_prompt_of(p) for p in prompts]
        token_lists = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._run(texts, token_lists, sampling_params, priority, use_tqdm, salts)

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             priority: PriorityArg = "normal", use_tqdm: bool = False, add_generation_prompt: bool | None = None,
             continue_final_message: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None) -> list[GenerationResult]:
        """Each conversation rendered by the model's chat template, then generated. `continue_final_message`:
        the model writes on in the last message; `chat_template_kwargs`: more variables for the template (Qwen3's
        `enable_thinking`, ...), as vLLM's LLM.chat takes them; `tools`: OpenAI's function tools, for the
        template (the output is the model's text: calls are not parsed out of it, as in vLLM's LLM.chat).
        `add_generation_prompt` left out: true unless continuing the final message."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        template_tools = None if tools is None else [
            ChatTool.model_validate(tool).for_template() for tool in tools]
        token_lists = [self.tokenizer.apply_chat_template([_text_message(m) for m in c], add_generation_prompt,
                                                          template_tools, continue_final_message, chat_template_kwargs)
                       for c in conversations]
        # vLLM's `prompt` of a chat result: the rendered conversation
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=False) for tokens in token_lists]
        return self._run(texts, token_lists, sampling_params, priority, use_tqdm)

    def _run(self, texts: list[str | None], token_lists: list[list[int]],
             sampling_params: SamplingParams | list[SamplingParams] | None, priority: PriorityArg,
             use_tqdm: bool, cache_salts: list[str | None] | None = None) -> list[GenerationResult]:
        with full_collections_deferred():
            return self._generate(texts, token_lists, sampling_params, priority, use_tqdm, cache_salts)

    def _generate(self, texts: list[str | None], token_lists: list[list[int]],
                  sampling_params: SamplingParams | list[SamplingParams] | None, priority: PriorityArg,
                  use_tqdm: bool, cache_salts: list[str | None] | None) -> list[GenerationResult]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        priorities = _priority_classes(priority, len(token_lists))
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise ValueError(f"{len(params_list)} sampling params for {len(token_lists)} prompts")
        # vLLM's max_tokens=None: as many as the context leaves
        params_list = [params if params.max_tokens is not None else msgspec.structs.replace(
            params, max_tokens=max(self.max_context_length - len(tokens), 1))
            for params, tokens in zip(params_list, token_lists)]
        params_list = [params.with_bad_words_tokenized(self.tokenizer.encode_text) for params in params_list]
        for params in params_list:
            params.validate(vocab_size=self.tokenizer.vocab_size)
        call = f"offline-{next(self._ids)}"
        results = [GenerationResult(text, tokens, request_id=f"{call}-{index}")
                   for index, (text, tokens) in enumerate(zip(texts, token_lists))]
        tracked: dict[str, _Tracked] = {}
        try:
            return self._generate_tracked(call, token_lists, params_list, priorities, use_tqdm, results, tracked,
                                          cache_salts)
        except BaseException as error:  # an error, or the caller's Ctrl-C: the next call must not find these running
            self.engine.abort(list(tracked))  # (the finished ones are not touched)
            try:
                self._drain()
            except Exception as drain_error:  # the caller hears of the first error, this one noted on it
                error.add_note(f"draining the engine after it failed too: {drain_error!r}")
            raise

    def _generate_tracked(self, call: str, token_lists: list[list[int]], params_list: list[SamplingParams],
                          priorities: list[str], use_tqdm: bool, results: list[GenerationResult],
                          tracked: dict[str, _Tracked], cache_salts: list[str | None] | None) -> list[GenerationResult]:
        """`call`: the id the requests' ids start with."""
        unsent: collections.deque[GenerateRequest] = collections.deque()
        for choice in plan_choices(call, token_lists, params_list, priorities, cache_salt=cache_salts):
            result = results[choice.prompt_index]
            output = CompletionOutput(len(result.outputs), "", [], None,
                                      [] if choice.request.params.logprobs is not None else None)
            result.outputs.append(output)
            token_text = self.tokenizer.token_decoded if choice.request.params.detokenize else None
            tracked[choice.request.request_id] = _Tracked(ChoiceDecoder(self.tokenizer, choice), result, output,
                                                          token_text)
            unsent.append(choice.request)
        self._refuse_any(unsent)
        self._send(unsent)
        with tqdm(total=len(tracked), desc="generating", disable=not use_tqdm) as progress:
            self._collect(tracked, unsent, progress)
        self._drain()
        return results

    def _refuse_any(self, requests: collections.deque[GenerateRequest]) -> None:
        """Raises for the first request the engine would refuse, before any runs: the queue takes the rest only as
        room frees, and a bad one among them would fail the call after the earlier ones had run."""
        checked: set[StructuredOutput] = set()  # a grammar checked once, not per prompt
        scheduler = self.engine.scheduler
        for request in requests:
            structured_output = request.params.structured_output
            refused = scheduler.refusal(request, check_grammar=structured_output not in checked)
            if refused is not None:
                raise (InvalidPrompt if 400 <= refused.error_code < 500 else GenerationError)(refused.error)
            checked.add(structured_output)

    def _send(self, unsent: collections.deque[GenerateRequest]) -> None:
        """Adds requests to the engine until its waiting queue is full (`max_waiting_requests`, a server's bound
        on its clients); those left wait here for room."""
        while unsent:
            error = self.engine.add_request(unsent[0])
            if error is not None:
                if error.error_code == QUEUE_FULL_STATUS:
                    return
                raise GenerationError(error.error)
            unsent.popleft()

    def _collect(self, tracked: dict[str, _Tracked], unsent: collections.deque[GenerateRequest],
                 progress: tqdm) -> None:
        """Steps the engine until every tracked choice has finished, its text and tokens in its output."""
        remaining = len(tracked)
        while remaining:
            self._send(unsent)
            for out in self.engine.step():
                entry = tracked.get(out.request_id)
                if entry is None or entry.decoder.finish_reason is not None:
                    continue
                if out.error:
                    raise GenerationError(out.error)
                delta = entry.decoder.decode(out)
                result, output = entry.result, entry.output
                if delta.prompt_logprobs is not None:
                    result.prompt_logprobs = [None] + [by_token(t, e, entry.token_text) for t, e in
                                                       zip(result.prompt_token_ids[1:], delta.prompt_logprobs)]
                output.text += delta.text
                output.token_ids += delta.token_ids
                if output.logprobs is not None:
                    output.logprobs += [by_token(t, e, entry.token_text)
                                        for t, e in zip(delta.token_ids, delta.logprobs or [])]
                if delta.finish_reason is not None:
                    output.finish_reason, output.stop_reason = delta.finish_reason, delta.stop_reason
                    result.num_cached_tokens = max(result.num_cached_tokens, delta.num_cached_tokens)
                    remaining -= 1
                    progress.update(1)
                    if out.finish_reason is None:
                        self.engine.abort([out.request_id])  # a stop string ended it

    def _drain(self) -> None:
        """Runs the engine until steps in flight are back, so the next call starts clean."""
        while self.engine.has_work():
            self.engine.step()

    def kv_usage(self) -> tuple[int, int]:
        """(free blocks, all blocks) of the KV pool."""
        allocator = self.engine.scheduler.allocator
        return allocator.num_free, allocator.num_blocks
