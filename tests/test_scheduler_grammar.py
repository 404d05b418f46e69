"""Grammar masks between the scheduler and a worker, in engine steps: with overlap a constrained row's mask
follows its step (after the previous step's tokens are in, before the next step), and without overlap it
rides in the step; either way every token the worker draws is one the grammar allows."""
from __future__ import annotations

import re
import threading
from collections import deque

import numpy as np
import pytest

from sfllm.config import ServerConfig
from sfllm.engine.engine_core import EngineCore
from sfllm.messages import PROTOCOL_VERSION, ForwardBatch, ForwardResult, GenerateRequest, GrammarMask, WorkerReady
from sfllm.sampling_params import SamplingParams, StructuredOutput, ThoughtTokens
from sfllm.scheduler.grammar_matchers import GrammarMatchers
from sfllm.structured_output import InvalidGrammar

PATTERN = r"[0-9]{3}-[a-z]{2}!"


class MaskingWorker:
    """Draws the smallest token a row's mask allows (token 100 for unconstrained rows); records the messages.
    As the real worker: a step that comes while the one before waits for its mask is held until that mask."""

    def __init__(self, vocab_size: int, eos: int, in_own_process: bool = True) -> None:
        self.in_own_process = in_own_process
        self.info = WorkerReady(protocol_version=PROTOCOL_VERSION, model_name="fake", max_context_length=256,
                                eos_token_ids=[eos], num_kv_blocks=64, num_cpu_kv_blocks=0, block_size=16,
                                vocab_size=vocab_size, pid=0)
        self.words = (vocab_size + 31) // 32
        self.messages: list[ForwardBatch | GrammarMask] = []
        self._waiting: ForwardBatch | None = None
        self._held: ForwardBatch | None = None
        self._results: deque[ForwardResult] = deque()
        self.in_flight = self.deepest = 0  # steps sent and not collected: now, and the most at once

    def submit(self, batch: ForwardBatch) -> None:
        self.messages.append(batch)
        self.in_flight += 1
        self.deepest = max(self.deepest, self.in_flight)
        assert len(batch.input_token_ids) == sum(batch.num_new_tokens), "one input token per new token"
        if self._waiting is None:
            self._start(batch)
            return
        assert self._held is None, "two steps came before the mask the first of them waits for"
        batch.grammar_mask = memoryview(bytes(batch.grammar_mask))  # a view of a buffer the next mask reuses
        self._held = batch

    def _start(self, batch: ForwardBatch) -> None:
        if batch.grammar_rows and not batch.grammar_mask:
            self._waiting = batch
        else:
            self._draw(batch, batch.grammar_mask)

    def send_grammar_mask(self, mask: GrammarMask) -> None:
        assert self._waiting is not None and self._waiting.step_id == mask.step_id
        self.messages.append(mask)
        batch, self._waiting = self._waiting, None
        self._draw(batch, mask.bitmask)
        if self._held is not None:
            held, self._held = self._held, None
            self._start(held)

    def _draw(self, batch: ForwardBatch, packed: bytes) -> None:
        rows = np.frombuffer(packed, dtype="<u4").reshape(len(batch.grammar_rows), self.words)
        masks = dict(zip(batch.grammar_rows, rows))
        tokens = []
        for row in range(sum(batch.sample)):
            if row in masks:
                bits = np.unpackbits(masks[row].view(np.uint8), bitorder="little")
                tokens.append(int(np.flatnonzero(bits)[0]))
            else:
                tokens.append(100)
        self._results.append(ForwardResult(step_id=batch.step_id, token_ids=tokens, logprobs=[None] * len(tokens)))

    def collect(self) -> ForwardResult:
        self.in_flight -= 1
        return self._results.popleft()


@pytest.mark.parametrize("overlap, in_own_process", [(True, True), (True, False), (False, True)])
def test_masks_reach_the_worker_in_order_and_constrain_every_token(smollm_tokenizer_spec, tokenizer,
                                                                   overlap: bool, in_own_process: bool) -> None:
    worker = MaskingWorker(smollm_tokenizer_spec.vocab_size, eos=2, in_own_process=in_own_process)
    core = EngineCore(ServerConfig(disable_overlap=not overlap).scheduler(), worker, smollm_tokenizer_spec)
    constrained = SamplingParams(max_tokens=30, structured_output=StructuredOutput.regex(PATTERN))
    for index, params in enumerate([constrained, SamplingParams(max_tokens=6, ignore_eos=True), constrained]):
        assert core.add_request(GenerateRequest(request_id=f"r{index}", prompt_token_ids=[5, 6, 7 + index],
                                                params=params)) is None
    outputs: dict[str, list[int]] = {}
    reasons = {}
    stop_tokens: dict[str, int | None] = {}
    while core.has_work():
        for output in core.step():
            outputs.setdefault(output.request_id, []).extend(output.token_ids)
            reasons[output.request_id] = output.finish_reason or reasons.get(output.request_id)
            if output.finish_reason is not None:
                stop_tokens[output.request_id] = output.stop_token_id
    for request_id in ("r0", "r2"):
        assert re.fullmatch(PATTERN, tokenizer.decode(outputs[request_id])), tokenizer.decode(outputs[request_id])
        assert reasons[request_id] == "stop"
        assert stop_tokens[request_id] is None, "the grammar's end, not a stop token: its last token is text"
    assert outputs["r1"] == [100] * 6
    late = [m for m in worker.messages if isinstance(m, GrammarMask)]
    if overlap:
        assert late, "decodes of constrained rows were sent before their previous tokens were in"
        behind_next = 0
        for mask in late:
            index = next(i for i, m in enumerate(worker.messages) if isinstance(m, ForwardBatch)
                         and m.step_id == mask.step_id)
            between = [m for m in worker.messages[index + 1:worker.messages.index(mask)] if isinstance(m, ForwardBatch)]
            assert len(between) <= 1, "the mask comes right after its step, or after the one step that follows it"
            behind_next += len(between)
        if in_own_process:
            assert behind_next, "the step after a late mask's goes before the mask, to be staged while it is filled"
            assert worker.deepest == 3, "it went out before the tokens the mask waits for were in"
        else:
            assert not behind_next, "in the engine's process nothing is staged meanwhile: the mask goes first"
            assert worker.deepest == 2
    else:
        assert not late


def test_a_grammar_that_fails_once_masked_ends_its_request_as_the_clients_error(smollm_tokenizer_spec) -> None:
    """A schema llguidance accepts but cannot mask (a $ref to itself and nothing else) is found out at the first
    mask: the request ends with a 400 saying so in a line, its blocks and grammar freed; the engine goes on."""
    worker = MaskingWorker(smollm_tokenizer_spec.vocab_size, eos=2)
    core = EngineCore(ServerConfig().scheduler(), worker, smollm_tokenizer_spec)
    endless = StructuredOutput.json_schema({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})
    requests = {"bad": SamplingParams(max_tokens=8, structured_output=endless),
                "good": SamplingParams(max_tokens=30, structured_output=StructuredOutput.regex(PATTERN))}
    for request_id, params in requests.items():
        assert core.add_request(GenerateRequest(request_id=request_id, prompt_token_ids=[5, 6, 7],
                                                params=params)) is None
    finished = {}
    while core.has_work():
        finished.update((output.request_id, output) for output in core.step() if output.finish_reason is not None)
    assert finished["good"].finish_reason == "stop"
    bad = finished["bad"]
    assert (bad.finish_reason, bad.error_code, bad.error_param) == ("error", 400, "response_format")
    assert "grammar" in bad.error and "\n" not in bad.error and len(bad.error) < 300, bad.error
    assert core.scheduler.allocator.num_free == worker.info.num_kv_blocks and not core.scheduler.requests


@pytest.mark.parametrize("overlap", [True, False])
def test_an_abort_mid_answer_frees_the_grammar_and_the_blocks(smollm_tokenizer_spec, overlap: bool) -> None:
    """A client gone mid-answer: with its step (and with overlap, its late mask) in flight, the request's matcher
    and blocks go at once; the step's mask still comes, and the other constrained request finishes."""
    worker = MaskingWorker(smollm_tokenizer_spec.vocab_size, eos=2)
    core = EngineCore(ServerConfig(disable_overlap=not overlap).scheduler(), worker, smollm_tokenizer_spec)
    constrained = SamplingParams(max_tokens=30, structured_output=StructuredOutput.regex(PATTERN))
    for request_id in ("gone", "kept"):
        assert core.add_request(GenerateRequest(request_id=request_id, prompt_token_ids=[5, 6, 7],
                                                params=constrained)) is None
    gone = core.scheduler.requests["gone"]
    finished = {}
    for _ in range(3):
        finished.update((o.request_id, o.finish_reason) for o in core.step() if o.finish_reason is not None)
    core.abort(["gone"])
    assert gone.matcher is None and not gone.block_ids
    while core.has_work():
        finished.update((o.request_id, o.finish_reason) for o in core.step() if o.finish_reason is not None)
    assert finished == {"kept": "stop"}
    assert core.scheduler.allocator.num_free == worker.info.num_kv_blocks and not core.scheduler.requests


def test_masks_reuse_one_buffer_and_rows_without_a_live_grammar_allow_every_token(smollm_tokenizer_spec) -> None:
    """The scheduler fills each step's masks into the buffer of the step before: a row whose request finished
    (or whose grammar failed) since then allows every token, not the token it allowed a step earlier."""
    vocab = smollm_tokenizer_spec.vocab_size
    grammars = GrammarMatchers(smollm_tokenizer_spec.tokenizer_json, vocab, [2])
    digits, letters, more_letters = (grammars.matcher(StructuredOutput.regex(pattern))
                                     for pattern in (r"[0-9]+", r"[a-z]+", r"[a-z]+"))

    def rows(packed: memoryview, count: int) -> np.ndarray:
        return np.frombuffer(packed, dtype="<u4").reshape(count, -1)

    first = rows(grammars.masks([digits, letters, more_letters]), 3).copy()
    assert (first[0] == np.frombuffer(digits.compute_bitmask(), dtype="<u4")[:first.shape[1]]).all()
    assert (first[1] == first[2]).all() and not (first[0] == first[1]).all() and (first != 0xFFFFFFFF).any()
    letters.consume_token(100_000)  # out of the vocabulary: the matcher is in error
    second = rows(grammars.masks([None, digits, letters]), 3)
    assert (second[0] == 0xFFFFFFFF).all() and (second[2] == 0xFFFFFFFF).all()
    assert (second[1] == first[0]).all()


def test_a_model_without_an_end_of_sequence_token_serves_and_refuses_grammars_as_the_clients_error(
        smollm_tokenizer_spec) -> None:
    """llguidance needs an EOS to end an output: without one the engine still starts (its tokenizer is built
    with the engine), and a constrained request is a 400 naming response_format, its blocks untouched."""
    worker = MaskingWorker(smollm_tokenizer_spec.vocab_size, eos=2)
    worker.info.eos_token_ids = []
    core = EngineCore(ServerConfig().scheduler(), worker, smollm_tokenizer_spec)
    refused = core.add_request(GenerateRequest(request_id="r", prompt_token_ids=[5, 6, 7], params=SamplingParams(
        max_tokens=4, structured_output=StructuredOutput.regex(PATTERN))))
    assert refused is not None and refused.error_code == 400 and "end-of-sequence" in refused.error
    assert refused.error_param == "response_format"
    assert core.add_request(GenerateRequest(request_id="plain", prompt_token_ids=[5, 6, 7],
                                            params=SamplingParams(max_tokens=3, ignore_eos=True))) is None
    tokens = []
    while core.has_work():
        tokens += [t for output in core.step() for t in output.token_ids]
    assert tokens == [100] * 3 and core.scheduler.allocator.num_free == worker.info.num_kv_blocks


def test_a_tokenizer_the_grammar_engine_cannot_read_leaves_grammars_refused_and_the_engine_serving() -> None:
    grammars = GrammarMatchers('{"model": {"type": "Unigram"}}', 1000, [2])
    assert grammars.unavailable.startswith("structured outputs are not available for this model's tokenizer")
    with pytest.raises(InvalidGrammar) as refused:
        grammars.matcher(StructuredOutput.regex(PATTERN))
    assert refused.value.param == "response_format" and "\n" not in str(refused.value)


def test_a_grammar_still_being_built_holds_up_only_its_own_request(smollm_tokenizer_spec, tokenizer,
                                                                    monkeypatch) -> None:
    """A new request's matcher and first mask are built in a thread (a lexer like a{1000000}'s takes 0.4 s at
    the first mask); the request is admitted once they are done, and meanwhile the others decode."""
    built = threading.Event()
    build = GrammarMatchers._build

    def held_build(self, grammar):
        assert built.wait(30), "the test never let the grammar finish"
        return build(self, grammar)

    monkeypatch.setattr(GrammarMatchers, "_build", held_build)
    worker = MaskingWorker(smollm_tokenizer_spec.vocab_size, eos=2)
    core = EngineCore(ServerConfig().scheduler(), worker, smollm_tokenizer_spec)
    constrained = SamplingParams(max_tokens=30, structured_output=StructuredOutput.regex(PATTERN))
    assert core.add_request(GenerateRequest(request_id="constrained", prompt_token_ids=[5, 6, 7],
                                            params=constrained)) is None
    assert core.add_request(GenerateRequest(request_id="plain", prompt_token_ids=[5, 6, 8],
                                            params=SamplingParams(max_tokens=5, ignore_eos=True))) is None
    outputs: dict[str, list[int]] = {"constrained": [], "plain": []}
    reasons = {}
    while reasons.get("plain") is None:
        for output in core.step():
            outputs[output.request_id].extend(output.token_ids)
            reasons[output.request_id] = output.finish_reason
    assert outputs == {"constrained": [], "plain": [100] * 5} and core.scheduler.grammars_compiling()
    assert core.add_request(GenerateRequest(request_id="gone", prompt_token_ids=[5, 6, 9], params=constrained)) is None
    assert [o.finish_reason for o in core.abort(["gone"])] == ["abort"], "a client may leave while its grammar builds"
    built.set()
    while core.has_work():
        for output in core.step():
            outputs[output.request_id].extend(output.token_ids)
            reasons[output.request_id] = output.finish_reason
    assert re.fullmatch(PATTERN, tokenizer.decode(outputs["constrained"])) and reasons["constrained"] == "stop"
    assert core.scheduler.allocator.num_free == worker.info.num_kv_blocks and not core.scheduler.grammars_compiling()
    assert not core.scheduler.requests


def test_a_grammar_beyond_the_engines_limits_is_the_clients_error(smollm_tokenizer_spec) -> None:
    """`a{1000000}` allows one token, "aaaa", which llguidance cannot consume within its limits ("too many
    expressions constructed"): a 400 saying so in a line, not a server error; the other request goes on."""
    worker = MaskingWorker(smollm_tokenizer_spec.vocab_size, eos=2)
    core = EngineCore(ServerConfig().scheduler(), worker, smollm_tokenizer_spec)
    huge = SamplingParams(max_tokens=4, structured_output=StructuredOutput.regex("a{1000000}"))
    assert core.add_request(GenerateRequest(request_id="huge", prompt_token_ids=[5, 6, 7], params=huge)) is None
    assert core.add_request(GenerateRequest(request_id="plain", prompt_token_ids=[5, 6, 8],
                                            params=SamplingParams(max_tokens=3, ignore_eos=True))) is None
    finished = {}
    while core.has_work():
        finished.update((o.request_id, o) for o in core.step() if o.finish_reason is not None)
    assert finished["plain"].finish_reason == "length"
    huge_output = finished["huge"]
    assert (huge_output.finish_reason, huge_output.error_code, huge_output.error_param) == ("error", 400,
                                                                                          "response_format")
    assert "limits" in huge_output.error and "\n" not in huge_output.error
    assert core.scheduler.allocator.num_free == worker.info.num_kv_blocks and not core.scheduler.requests


@pytest.mark.parametrize("thought, expected_prefix, finish", [
    # the output may open a thought: its start token (1) is allowed beside the grammar's, and the worker draws it
    # (the smallest); the thought is free (the worker draws token 0, its end); then the grammar
    (ThoughtTokens(start=1, end=0), [1, 0], "stop"),
    # the prompt opened it: free from the first token
    (ThoughtTokens(start=1, end=0, opened=True), [0], "stop"),
    # a start token above every token the grammar allows first: not drawn, and the grammar writes the answer at once
    (ThoughtTokens(start=40000, end=0), [], "stop"),
    # a thought that never ends is never constrained: cut by max_tokens
    (ThoughtTokens(start=1, end=7), [1, 0, 0, 0, 0, 0], "length"),
])
def test_a_grammar_after_a_thought_applies_once_the_thought_ends(smollm_tokenizer_spec, tokenizer, thought,
                                                                 expected_prefix, finish) -> None:
    """A reasoning parser's constrained request (sfllm/scheduler/grammar_after_thought.py), with overlap: its
    phase follows the tokens that came back before each late mask."""
    worker = MaskingWorker(smollm_tokenizer_spec.vocab_size, eos=2)
    core = EngineCore(ServerConfig().scheduler(), worker, smollm_tokenizer_spec)
    structured = StructuredOutput("regex", PATTERN, after_thought=thought)
    max_tokens = 6 if finish == "length" else 30
    assert core.add_request(GenerateRequest(request_id="r", prompt_token_ids=[5, 6, 7], params=SamplingParams(
        max_tokens=max_tokens, structured_output=structured))) is None
    tokens, reasons = [], []
    while core.has_work():
        for output in core.step():
            tokens += output.token_ids
            reasons.append(output.finish_reason)
    assert tokens[:len(expected_prefix)] == expected_prefix and reasons[-1] == finish, (tokens, reasons)
    if finish == "stop":
        assert re.fullmatch(PATTERN, tokenizer.decode(tokens[len(expected_prefix):])), tokens
    assert core.scheduler.allocator.num_free == worker.info.num_kv_blocks and not core.scheduler.requests


def test_a_thought_token_outside_the_vocabulary_is_the_clients_error(smollm_tokenizer_spec) -> None:
    worker = MaskingWorker(smollm_tokenizer_spec.vocab_size, eos=2)
    core = EngineCore(ServerConfig().scheduler(), worker, smollm_tokenizer_spec)
    structured = StructuredOutput("regex", PATTERN, after_thought=ThoughtTokens(start=1, end=10**6))
    refused = core.add_request(GenerateRequest(request_id="r", prompt_token_ids=[5, 6, 7], params=SamplingParams(
        max_tokens=4, structured_output=structured)))
    assert refused is not None and refused.error_code == 400 and "outside the vocabulary" in refused.error


def test_the_grammar_tokenizer_built_while_the_worker_loads_is_the_one_the_engine_uses(smollm_llm, tmp_path) -> None:
    """The engine process builds the grammar engine's tokenizer in a thread while the worker loads (0.3 s it
    waited for after the worker was ready), for the model config's vocabulary and end tokens: the default
    model's worker reports the same, so the engine core takes it; a worker reporting others gets its own."""
    from sfllm.engine.engine_process import _model_for_frontends
    config = ServerConfig(port=8099, run_dir=str(tmp_path)).engine()
    spec, _, building = _model_for_frontends(config)
    prebuilt = building.result(timeout=60)
    info = smollm_llm.engine.worker.info  # a real worker's report on the default model
    assert prebuilt.built_for(info.vocab_size, info.eos_token_ids)
    worker = MaskingWorker(info.vocab_size, eos=info.eos_token_ids[0])
    worker.info.eos_token_ids = list(info.eos_token_ids)
    assert EngineCore(ServerConfig().scheduler(), worker, spec, grammars=prebuilt).scheduler.grammars is prebuilt
    worker.info.eos_token_ids = [info.eos_token_ids[0], 7]
    rebuilt = EngineCore(ServerConfig().scheduler(), worker, spec, grammars=prebuilt).scheduler.grammars
    assert rebuilt is not prebuilt and rebuilt.built_for(info.vocab_size, [info.eos_token_ids[0], 7])
    assert EngineCore(ServerConfig().scheduler(), worker, None, grammars=prebuilt).scheduler.grammars is None
