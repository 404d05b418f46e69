"""The offline API: `LLM(model=...).generate(prompts, params)`.

It drives the same EngineCore, Scheduler and ModelRunner as the server, with the worker
in this process instead of behind a socket, and the frontend's tokenizer and
detokenizer for text.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import msgspec
from tqdm import tqdm

from sfllm.config import DEFAULT_MODEL, load_config
from sfllm.frontend.detokenizer import IncrementalDetokenizer
from sfllm.frontend.tokenizer import Tokenizer
from sfllm.messages import GenerateRequest, SampledLogprobs
from sfllm.model_source import resolve_model
from sfllm.model_source.tokenizer_spec import tokenizer_spec
from sfllm.sampling_params import SamplingParams
from sfllm.scheduler.engine_core import EngineCore
from sfllm.worker.inprocess_worker import InProcessWorker


class GenerationError(RuntimeError):
    pass


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[SampledLogprobs] | None = None


@dataclass
class GenerationResult:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0


@dataclass
class _Tracked:
    result: GenerationResult
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer | None  # None: token ids only (SamplingParams.detokenize off)
    done: bool = False


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **config: Any) -> None:
        self.config = load_config(environ={}, model=model, **config)
        self.source = resolve_model(self.config.model, self.config.load_format, self.config.cache_dir)
        self.tokenizer = Tokenizer(tokenizer_spec(self.source))
        self.engine = EngineCore(self.config, InProcessWorker(self.config, self.source))
        self._ids = itertools.count()

    @property
    def max_context_length(self) -> int:
        return self.engine.worker.info.max_context_length

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 priority: str = "normal", use_tqdm: bool = False) -> list[GenerationResult]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._run(texts, token_lists, sampling_params, priority, use_tqdm)

    def chat(self, conversations: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             priority: str = "normal", use_tqdm: bool = False) -> list[GenerationResult]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        token_lists = [self.tokenizer.apply_chat_template(c) for c in conversations]
        return self._run([None] * len(token_lists), token_lists, sampling_params, priority, use_tqdm)

    def _run(self, texts: list[str | None], token_lists: list[list[int]],
             sampling_params: SamplingParams | list[SamplingParams] | None, priority: str,
             use_tqdm: bool) -> list[GenerationResult]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise ValueError(f"{len(params_list)} sampling params for {len(token_lists)} prompts")
        results: list[GenerationResult] = []
        tracked: dict[str, _Tracked] = {}
        for text, tokens, params in zip(texts, token_lists, params_list):
            params.validate()
            result = GenerationResult(text, tokens)
            results.append(result)
            for index in range(params.n):
                sub_params = params if params.n == 1 else msgspec.structs.replace(
                    params, n=1, seed=None if params.seed is None else params.seed + index)
                request_id = f"offline-{next(self._ids)}"
                output = CompletionOutput(index, "", [], None, [] if params.logprobs is not None else None)
                result.outputs.append(output)
                detokenizer = IncrementalDetokenizer(self.tokenizer, tokens, sub_params) if params.detokenize else None
                tracked[request_id] = _Tracked(result, output, detokenizer)
                error = self.engine.add_request(GenerateRequest(request_id=request_id, prompt_token_ids=tokens,
                                                                params=sub_params, priority=priority))
                if error is not None:
                    self.engine.abort(list(tracked))
                    self._drain()
                    raise GenerationError(error.error)
        progress = tqdm(total=len(tracked), desc="generating", disable=not use_tqdm)
        remaining = len(tracked)
        while remaining:
            for out in self.engine.step():
                entry = tracked.get(out.request_id)
                if entry is None or entry.done:
                    continue
                if self._absorb(entry, out):
                    entry.done = True
                    remaining -= 1
                    progress.update(1)
                    if out.finish_reason is None:
                        self.engine.abort([out.request_id])  # a stop string ended it
        progress.close()
        self._drain()
        return results

    def _absorb(self, entry: _Tracked, out) -> bool:
        """Adds an engine output to its completion; True when the completion is done."""
        if out.error:
            raise GenerationError(out.error)
        output, detokenizer = entry.output, entry.detokenizer
        detokenize = detokenizer is not None
        for token, logprob in zip(out.token_ids, out.logprobs or [None] * len(out.token_ids)):
            if detokenize:
                output.text += detokenizer.append([token])
            output.token_ids.append(token)
            if output.logprobs is not None:
                output.logprobs.append(logprob)
            if detokenize and detokenizer.matched_stop is not None:
                output.finish_reason = "stop"
                return True
        if out.finish_reason is not None:
            if detokenize:
                output.text += detokenizer.flush()
            output.finish_reason = out.finish_reason
            entry.result.num_cached_tokens = max(entry.result.num_cached_tokens, out.num_cached_tokens)
            return True
        return False

    def _drain(self) -> None:
        """Runs the engine until steps in flight are back, so the next call starts clean."""
        while self.engine.has_work():
            self.engine.step()

    def kv_usage(self) -> tuple[int, int]:
        """(free blocks, all blocks) of the KV pool."""
        allocator = self.engine.scheduler.allocator
        return allocator.num_free, allocator.num_blocks
