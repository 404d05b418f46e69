"""The worker's held steps (ModelRunner: `ForwardBatch.hold_s`, `urgent`): a held step is staged at once and
launched later; an urgent step goes before it, and the held step's inputs, which the urgent step's staging
overwrote in the graphs' one input buffer, are staged again. Every step's tokens must equal those of the same
steps run in the order they came.

The tiny model in float32 with greedy sampling. On a GPU the runner's own captured graphs run; on the CPU the
graphs' step functions run uncaptured (with the Triton kernels interpreted), on the same staging and buffer.
"""
from __future__ import annotations

import time

import pytest
import torch
from tiny_models import tiny_qwen3_runner

from sfllm.messages import BlockTableUpdate, ForwardBatch, SequenceSampling
from sfllm.sampling_params import SamplingParams
from sfllm.worker.cuda_graph_runner import CudaGraphRunner
from sfllm.worker.kv_splits import KVSplits
from sfllm.worker.model_runner import ModelRunner
from sfllm.worker.pending_step import PendingStep
from sfllm.worker.step_inputs import StepShape

# (conftest.py has the Triton kernels interpreted where there is no GPU)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 512
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


class UncapturedGraphs(CudaGraphRunner):
    """The graph runner on the CPU: a replay runs the step function a graph would capture. Its tokens are a
    copy, as the device-to-host copy of a GPU's are (on the CPU, PendingStep would keep the buffer itself)."""

    def replay(self, shape: StepShape, num_sampled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.run_step(shape)
        tokens, logits, slots = self.outputs(shape, num_sampled)
        return tokens.clone(), logits, slots


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ModelRunner:
    pytest.importorskip("triton")
    runner = tiny_qwen3_runner(tmp_path_factory.mktemp("tiny-qwen3"), VOCAB, DEVICE)
    if runner.graph_runner is None:
        splits = KVSplits(runner.backend.name, runner.shard.num_kv_heads, runner.max_context_length, runner.device)
        runner.graph_runner = UncapturedGraphs(runner.model, runner.backend, runner.block_tables, runner.last_tokens,
                                               splits, runner.device, max_decode_batch=8, max_mixed_tokens=64,
                                               max_seqs=runner.max_slots, seed=0)
    runner.may_defer = True
    return runner


def prompt(length: int, offset: int) -> list[int]:
    return [(7 * i + offset) % VOCAB for i in range(length)]


def three_steps(first_step: int, slots: list[int], first_block: int, hold_s: float) -> list[ForwardBatch]:
    """Two prompts prefilled; their decode, held for `hold_s`; a third prompt's prefill, urgent."""
    a, b, c = slots
    blocks = [[first_block], [first_block + 1, first_block + 2], [first_block + 3]]
    prefill = ForwardBatch(step_id=first_step, slots=[a, b], num_new_tokens=[9, 17], context_lens=[9, 17],
                           input_token_ids=prompt(9, 1) + prompt(17, 2), sample=[True, True],
                           new_sequences=[SequenceSampling(slot=s, params=GREEDY) for s in (a, b)],
                           block_table_updates=[BlockTableUpdate(a, 0, blocks[0]), BlockTableUpdate(b, 0, blocks[1])])
    decode = ForwardBatch(step_id=first_step + 1, slots=[a, b], num_new_tokens=[1, 1], context_lens=[10, 18],
                          input_token_ids=[-1, -1], sample=[True, True], hold_s=hold_s)
    urgent = ForwardBatch(step_id=first_step + 2, slots=[c], num_new_tokens=[12], context_lens=[12],
                          input_token_ids=prompt(12, 3), sample=[True], urgent=True,
                          new_sequences=[SequenceSampling(slot=c, params=GREEDY)],
                          block_table_updates=[BlockTableUpdate(c, 0, blocks[2])])
    return [prefill, decode, urgent]


def tokens_by_step(runner: ModelRunner, count: int) -> dict[int, list[int]]:
    results = [runner.next_result(wait=True) for _ in range(count)]
    assert all(r is not None for r in results)
    return {r.step_id: r.token_ids for r in results}


def test_an_urgent_step_runs_before_a_held_step_and_both_give_their_tokens(runner: ModelRunner,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for batch in three_steps(0, [0, 1, 2], 0, hold_s=0.0):
        runner.take(batch)
    expected = tokens_by_step(runner, 3)
    assert runner.graph_runner.shape_for(three_steps(0, [0, 1, 2], 0, 0.0)[2]).num_tokens == 64, "graph steps"

    prefill, decode, urgent = three_steps(10, [3, 4, 5], 8, hold_s=60.0)
    runner.take(prefill)
    monkeypatch.setattr(PendingStep, "ready", lambda self: False)  # the prefill still runs on the device
    assert runner.take(decode) == [], "held"
    assert [p.step_id for p in runner.take(urgent)] == [12], "the urgent step goes first"
    assert runner.launch_due(time.perf_counter()) == [], "the held step waits for its hold or the steps before"
    monkeypatch.undo()
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    assert [p.step_id for p in runner.launch_due(time.perf_counter())] == [11], "the steps before it are done"
    results = [runner.next_result(wait=True) for _ in range(3)]
    assert [r.step_id for r in results] == [10, 12, 11], "results in launch order"
    assert {r.step_id - 10: r.token_ids for r in results} == expected


def test_a_held_step_launches_at_its_hold_or_before_the_next_step(runner: ModelRunner,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    prefill, decode, _ = three_steps(20, [0, 1, 2], 16, hold_s=0.05)
    runner.take(prefill)
    monkeypatch.setattr(PendingStep, "ready", lambda self: False)
    assert runner.take(decode) == [] and 0 < runner.seconds_until_due(time.perf_counter()) <= 0.05
    assert runner.launch_due(time.perf_counter() + 0.06)[0].step_id == 21, "its hold is over"
    decode.step_id, decode.context_lens = 22, [11, 19]
    assert runner.take(decode) == []
    follow = ForwardBatch(step_id=23, slots=[0, 1], num_new_tokens=[1, 1], context_lens=[12, 20],
                          input_token_ids=[-1, -1], sample=[True, True])
    assert [p.step_id for p in runner.take(follow)] == [22, 23], "a step that is not urgent keeps the order"
    monkeypatch.undo()
    assert [r.step_id for r in (runner.next_result(wait=True) for _ in range(4))] == [20, 21, 22, 23]
    assert runner.seconds_until_due(time.perf_counter()) is None
