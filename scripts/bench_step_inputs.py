"""Host time of build_step_inputs for decode batches (600-token contexts), on the CPU or a GPU.

    python scripts/bench_step_inputs.py [cpu|cuda]
"""
from __future__ import annotations

import sys
import timeit

import torch

from sfllm.messages import ForwardBatch
from sfllm.worker.step_inputs import build_step_inputs


def decode_batch(num_seqs: int, context_len: int = 600, block_size: int = 16) -> ForwardBatch:
    blocks = -(-context_len // block_size)
    return ForwardBatch(step_id=1, slots=list(range(num_seqs)), num_new_tokens=[1] * num_seqs,
                        context_lens=[context_len] * num_seqs, input_token_ids=[-1] * num_seqs,
                        block_tables=[list(range(i * blocks, (i + 1) * blocks)) for i in range(num_seqs)],
                        sample=[True] * num_seqs)


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    last_tokens = torch.zeros(256, dtype=torch.int64, device=device)
    for num_seqs in (1, 16, 64, 256):
        batch = decode_batch(num_seqs)
        # the fastest of several repeats: on a shared machine the others measure its neighbours
        seconds = min(timeit.repeat(lambda: build_step_inputs(batch, 16, last_tokens, device), number=100,
                                    repeat=7)) / 100
        print(f"batch {num_seqs}: {seconds * 1e6:.0f} us")


if __name__ == "__main__":
    main()
