"""What a captured graph runs, against the eager step, on the CPU: the graph runner's staging (padding to
a graph's shape, attention tiles, decode rows in a mixed step, sampled rows) and its step function,
run without capture with the Triton kernels interpreted, give the eager step's logits and tokens. The
GPU suite (tests/gpu) checks the captured graphs themselves."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from sfllm.kernels.device_check import KERNELS_INTERPRETED  # noqa: E402
from tiny_models import tiny_qwen3_runner  # noqa: E402

from sfllm.messages import BlockTableUpdate, ForwardBatch, SequenceSampling  # noqa: E402
from sfllm.sampling_params import SamplingParams  # noqa: E402
from sfllm.worker.cuda_graph_runner import CudaGraphRunner  # noqa: E402
from sfllm.worker.kv_splits import KVSplits  # noqa: E402
from sfllm.worker.model_runner import ModelRunner  # noqa: E402

DEVICE = "cpu" if KERNELS_INTERPRETED else "cuda"
VOCAB = 512
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ModelRunner:
    return tiny_qwen3_runner(tmp_path_factory.mktemp("tiny-qwen3"), VOCAB, DEVICE)


def graphs_for(runner: ModelRunner) -> CudaGraphRunner:
    splits = KVSplits(runner.backend.name, runner.shard.num_kv_heads, runner.max_context_length, runner.device)
    return CudaGraphRunner(runner.model, runner.backend, runner.block_tables, runner.last_tokens, splits,
                           runner.device, max_decode_batch=8, max_mixed_tokens=64, max_seqs=runner.max_slots, seed=0)


def prompt(length: int, offset: int) -> list[int]:
    return [(7 * i + offset) % VOCAB for i in range(length)]


def eager_logits(runner: ModelRunner, batch: ForwardBatch) -> torch.Tensor:
    with torch.inference_mode():
        hidden, _ = runner.eager.forward(batch, runner.slot_temperature)
        return runner.model.compute_logits(hidden)


def graph_step(runner: ModelRunner, graphs: CudaGraphRunner, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    shape = graphs.shape_for(batch)
    assert shape is not None
    with torch.inference_mode():
        num_sampled = graphs.stage(batch, shape, runner.slot_temperature)
        graphs.run_step(shape)
    return graphs.logits[:num_sampled].float(), graphs.tokens[:num_sampled].clone()


def test_graph_step_equals_the_eager_step(runner: ModelRunner) -> None:
    graphs = graphs_for(runner)
    sequences = [SequenceSampling(slot=s, params=GREEDY) for s in range(5)]
    # Step 1, eager: prefill slots 1 and 2 (their KV is what the next steps' decodes read).
    first = ForwardBatch(step_id=0, slots=[1, 2], num_new_tokens=[9, 17], context_lens=[9, 17],
                         input_token_ids=prompt(9, 1) + prompt(17, 2), sample=[True, True], new_sequences=sequences,
                         block_table_updates=[BlockTableUpdate(1, 0, [0]), BlockTableUpdate(2, 0, [1, 2])])
    runner.execute(first)
    assert len(runner.next_result(wait=True).token_ids) == 2

    # Step 2, a mixed step: slot 0 prefills 20 tokens, slots 1 and 2 decode the tokens step 1 sampled
    # (placeholders), slot 3 prefills a chunk that does not sample, slot 4 a prompt of one token.
    mixed = ForwardBatch(step_id=1, slots=[0, 1, 2, 3, 4], num_new_tokens=[20, 1, 1, 5, 1],
                         context_lens=[20, 10, 18, 5, 1], input_token_ids=prompt(20, 3) + [-1, -1] + prompt(5, 4) + [9],
                         sample=[True, True, True, False, True],
                         block_table_updates=[BlockTableUpdate(0, 0, [3, 4]), BlockTableUpdate(3, 0, [5]),
                                              BlockTableUpdate(4, 0, [6])])
    runner.block_tables.apply(mixed.block_table_updates)
    expected = eager_logits(runner, mixed)
    assert graphs.shape_for(mixed).num_tokens == 64, "28 tokens pad to the smallest mixed graph"
    logits, tokens = graph_step(runner, graphs, mixed)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert tokens.tolist() == expected.argmax(dim=-1).tolist()
    assert runner.last_tokens[[0, 1, 2, 4]].tolist() == tokens.tolist(), "the sampled tokens are the next inputs"

    # Step 3, decodes only: five of them pad to the decode graph of six.
    decode = ForwardBatch(step_id=2, slots=[0, 1, 2, 3, 4], num_new_tokens=[1] * 5, context_lens=[21, 11, 19, 6, 2],
                          input_token_ids=[-1, -1, -1, 11, -1], sample=[True] * 5)
    assert graphs.shape_for(decode).decode_only and graphs.shape_for(decode).num_seqs == 6
    expected = eager_logits(runner, decode)
    logits, tokens = graph_step(runner, graphs, decode)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert tokens.tolist() == expected.argmax(dim=-1).tolist()


def test_graph_verify_step_equals_the_eager_step(runner: ModelRunner) -> None:
    """Speculative decoding's verify step: a sequence of one token and three drafts samples all four
    positions, in a graph of the small sizes kept for verify steps, as the eager step does."""
    splits = KVSplits(runner.backend.name, runner.shard.num_kv_heads, runner.max_context_length, runner.device)
    graphs = CudaGraphRunner(runner.model, runner.backend, runner.block_tables, runner.last_tokens, splits,
                             runner.device, max_decode_batch=8, max_mixed_tokens=64, max_seqs=runner.max_slots, seed=0,
                             num_speculative_tokens=3, max_speculative_batch=2)
    assert graphs.mixed_sizes[:3] == [4, 8, 64], "(1 + K) per speculating sequence, then the mixed sizes"
    sequences = [SequenceSampling(slot=s, params=GREEDY) for s in (5, 6)]
    first = ForwardBatch(step_id=10, slots=[5, 6], num_new_tokens=[6, 11], context_lens=[6, 11],
                         input_token_ids=prompt(6, 5) + prompt(11, 6), sample=[True, True], new_sequences=sequences,
                         block_table_updates=[BlockTableUpdate(5, 0, [7]), BlockTableUpdate(6, 0, [8])])
    runner.execute(first)
    runner.next_result(wait=True)
    # slot 5 decodes its sampled token and three drafts; slot 6 decodes one token without drafts
    verify = ForwardBatch(step_id=11, slots=[5, 6], num_new_tokens=[4, 1], context_lens=[10, 12],
                          input_token_ids=[-1, 3, 4, 5, -1], sample=[True, True], num_draft_tokens=[3, 0])
    expected = eager_logits(runner, verify)
    assert expected.shape[0] == 5, "four rows for slot 5, one for slot 6"
    shape = graphs.shape_for(verify)
    assert shape.num_tokens == 8 and shape.num_logit_rows >= 5
    logits, tokens = graph_step(runner, graphs, verify)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert tokens.tolist() == expected.argmax(dim=-1).tolist()
    assert runner.last_tokens[[5, 6]].tolist() == [tokens[3].item(), tokens[4].item()], "each sequence's last row"
