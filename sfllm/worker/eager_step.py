"""The model on one batch, op by op: what runs where no captured graph fits (CPU devices, graphs turned
off, steps past the graphs' sizes), and the memory planner's profiling step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sfllm.messages import ForwardBatch
from sfllm.worker.attention.backend import AttentionBackend
from sfllm.worker.block_tables import BlockTables
from sfllm.worker.kv_splits import KVSplits
from sfllm.worker.model import CausalLM
from sfllm.worker.step_inputs import StepStaging, StepTensors, device_metadata, exact_shape, stage_step


@dataclass
class EagerStep:
    model: CausalLM
    backend: AttentionBackend
    tables: BlockTables
    last_tokens: torch.Tensor
    kv_splits: KVSplits
    staging: StepStaging

    def __post_init__(self) -> None:
        self.tile_rows = self.backend.extend_tile_rows(self.model.embed_tokens.weight.dtype, self.staging.device)

    def forward(self, batch: ForwardBatch, slot_temperatures: np.ndarray) -> tuple[torch.Tensor, StepTensors]:
        """Hidden states [N, hidden] of the batch's N sampled rows, and the step's tensors (whose first N
        sample_slots are those rows' slots)."""
        hidden, tensors = self.hidden_states(batch, slot_temperatures)
        return hidden.index_select(0, tensors.logits_indices[:sum(batch.sampled_rows())]), tensors

    def hidden_states(self, batch: ForwardBatch, slot_temperatures: np.ndarray) -> tuple[torch.Tensor, StepTensors]:
        """Hidden states [T, hidden] of all the batch's new tokens, and the step's tensors."""
        shape = exact_shape(batch, self.tile_rows)
        host_buffer, host = self.staging.host(shape)
        stage_step(batch, shape, host, slot_temperatures, self.tables.padding_slot, self.tile_rows)
        tensors = shape.views(self.staging.copy(host_buffer))
        input_ids, meta = device_metadata(tensors, shape, self.tables, self.last_tokens,
                                          self.kv_splits(len(batch.slots)), batch)
        self.backend.prepare(meta)
        return self.model(input_ids, tensors.positions, self.backend, meta), tensors
