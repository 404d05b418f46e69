"""Host time of staging a decode step (600-token contexts) into a graph's pinned input buffer, and of
applying a step's block-table updates, on the CPU or a GPU.

    python scripts/bench_step_inputs.py [cpu|cuda]
"""
from __future__ import annotations

import sys
import timeit

import numpy as np
import torch

from sfllm.messages import BlockTableUpdate, ForwardBatch
from sfllm.worker.block_tables import BlockTables
from sfllm.worker.step_inputs import StepShape, StepStaging, stage_step

BLOCK_SIZE = 16
MAX_SLOTS = 256


def decode_batch(num_seqs: int, context_len: int = 600) -> ForwardBatch:
    # one sequence in sixteen crosses into a new block on a given step
    updates = [BlockTableUpdate(slot, context_len // BLOCK_SIZE, [slot]) for slot in range(0, num_seqs, 16)]
    return ForwardBatch(step_id=1, slots=list(range(num_seqs)), num_new_tokens=[1] * num_seqs,
                        context_lens=[context_len] * num_seqs, input_token_ids=[-1] * num_seqs,
                        sample=[True] * num_seqs, block_table_updates=updates)


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    staging = StepStaging(device)
    tables = BlockTables(MAX_SLOTS, 256, BLOCK_SIZE, device)
    temperatures = np.zeros(MAX_SLOTS + 1, dtype=np.float32)
    device_buffer = torch.zeros(1 << 20, dtype=torch.uint8, device=device)

    def stage(batch: ForwardBatch, shape: StepShape) -> None:
        host_buffer, host = staging.host(shape)
        stage_step(batch, shape, host, temperatures, MAX_SLOTS, None)
        staging.copy(host_buffer, device_buffer)

    for num_seqs in (1, 16, 64, 256):
        batch = decode_batch(num_seqs)
        shape = StepShape(num_seqs, num_seqs, 0, decode_only=True)
        # the fastest of several repeats: on a shared machine the others measure its neighbours
        staged = min(timeit.repeat(lambda: stage(batch, shape), number=100, repeat=7)) / 100
        updated = min(timeit.repeat(lambda: tables.apply(batch.block_table_updates), number=100, repeat=7)) / 100
        print(f"batch {num_seqs}: staging {staged * 1e6:.0f} us, block-table updates "
              f"({len(batch.block_table_updates)}) {updated * 1e6:.0f} us")


if __name__ == "__main__":
    main()
