"""How many split-KV partitions a step's decode rows get, from shapes alone.

A captured graph fixes the count for its batch capacity; an eager step of the same batch must split
alike to give the same numbers, so both ask this rule with the capacity they run at.
"""
from __future__ import annotations

import torch


class KVSplits:
    def __init__(self, backend_name: str, num_kv_heads: int, max_context_length: int, device: torch.device) -> None:
        self._enabled = device.type == "cuda" and backend_name == "triton"
        self._num_kv_heads = num_kv_heads
        self._max_context_length = max_context_length
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if self._enabled else 0

    def __call__(self, num_seqs: int) -> int | None:
        """The count for a step of `num_seqs` sequences; None where the backend decides (no split-KV)."""
        if not self._enabled:
            return None
        from sfllm.kernels import choose_num_kv_splits
        return choose_num_kv_splits(num_seqs, self._num_kv_heads, self._max_context_length, self._num_sms)
