"""Executes ForwardBatches on the model: the worker's whole job, without the sockets.

`execute` only launches device work and returns a `PendingStep`; reading its tokens
(the one synchronisation of a step) happens when the caller asks for the result, so the
next step can be launched before the previous one has finished.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from sfllm.config import EngineConfig
from sfllm.loop_time import LoopTime
from sfllm.messages import ForwardBatch, ForwardResult, SampledLogprobs, TokenLogprob
from sfllm.model_source import ModelSource
from sfllm.nvtx import nvtx_range
from sfllm.sampling_params import SamplingParams
from sfllm.worker.attention.registry import create_attention_backend
from sfllm.worker.cuda_graph_runner import DecodeGraphRunner
from sfllm.worker.kv_cache import KVCache
from sfllm.worker.memory_planner import GIB, MemoryPlan, plan_cpu_memory, plan_gpu_memory
from sfllm.worker.pinned_staging import PinnedStaging
from sfllm.worker.sampler import Sampler, SamplerOutput, SamplingInputs, temperature_only
from sfllm.worker.step_inputs import StepInputs, build_step_inputs
from sfllm.worker.step_profiler import StepProfiler
from sfllm.worker.weight_loader import load_model

logger = logging.getLogger(__name__)

GPU_MEMORY_REFRESH_S = 1.0  # reading the allocator's statistics costs ~100s of us: not on every step

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def pick_dtype(name: str, config_dtype: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    # as vLLM does: float32 checkpoints (and our dequantised GGUFs) run in half precision on GPUs
    dtype = _DTYPES.get(config_dtype, torch.bfloat16)
    return torch.bfloat16 if dtype == torch.float32 else dtype


@dataclass
class SlotState:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


class PendingStep:
    """The launched step; `result()` waits for its tokens and packs them."""

    def __init__(self, runner: ModelRunner, step_id: int, output: SamplerOutput | None, slots: list[int],
                 logprob_counts: list[int | None], started: float) -> None:
        self._runner = runner
        self._step_id = step_id
        self._slots = slots
        self._logprob_counts = logprob_counts
        self._started = started
        self._result: ForwardResult | None = None
        self._event = None
        self._host: list[torch.Tensor | None] = []
        if output is not None:
            tensors = [output.token_ids, output.logprobs, output.top_token_ids, output.top_logprobs]
            non_blocking = output.token_ids.device.type == "cuda"
            self._host = [None if t is None else t.to("cpu", non_blocking=non_blocking) for t in tensors]
            if non_blocking:
                self._event = torch.cuda.Event()
                self._event.record()

    def ready(self) -> bool:
        """True once the device finished the step (reading its result will not block)."""
        return self._result is not None or self._event is None or self._event.query()

    def result(self) -> ForwardResult:
        if self._result is None:
            self._runner.resolve_through(self)
        return self._result

    def resolve(self) -> None:
        if self._event is not None:
            self._event.synchronize()
        self._result = self._pack()
        self._runner.record_outputs(self._slots, self._result.token_ids)

    def _pack(self) -> ForwardResult:
        if not self._host:
            return ForwardResult(step_id=self._step_id, token_ids=[], logprobs=[])
        tokens, chosen, top_ids, top_logprobs = self._host
        token_ids = tokens.tolist()
        logprobs: list[SampledLogprobs | None] = []
        for row, count in enumerate(self._logprob_counts):
            if count is None:
                logprobs.append(None)
                continue
            top = [TokenLogprob(int(i), float(lp)) for i, lp in zip(top_ids[row, :count].tolist(),
                                                                    top_logprobs[row, :count].tolist())]
            logprobs.append(SampledLogprobs(float(chosen[row]), top))
        allocated, reserved = self._runner.gpu_memory()
        return ForwardResult(step_id=self._step_id, token_ids=token_ids, logprobs=logprobs,
                             forward_time_s=time.perf_counter() - self._started,
                             gpu_memory_allocated=allocated, gpu_memory_reserved=reserved)


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        self.source = source
        model_config = source.config
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, model_config.torch_dtype, self.device)
        if self.device.type == "cpu":
            # All cores by default: the frontend and scheduler mostly wait while a step computes.
            # On a machine busy with other work, fewer threads avoid an OpenMP team stalling on a
            # preempted member (seen: a small matmul at 2.7 ms with 2 threads, 16 us with 1).
            torch.set_num_threads(config.cpu_threads or len(os.sched_getaffinity(0)))
        logger.info("device %s, dtype %s (--dtype %s)", self.device, str(self.dtype).removeprefix("torch."),
                    config.dtype)
        self.max_context_length = min(config.max_context_length or model_config.max_position_embeddings,
                                      model_config.max_position_embeddings)
        self.block_size = config.block_size
        self.model = load_model(source, self.dtype, self.device, self.max_context_length, config.seed)
        self.max_slots = config.max_running_requests
        self.sampler = Sampler(config.seed)
        # one spare row past the slots: padding rows of a captured decode step write their token there
        self.padding_slot = self.max_slots
        self.last_tokens = torch.zeros(self.max_slots + 1, dtype=torch.int64, device=self.device)
        self.slots: list[SlotState | None] = [None] * self.max_slots
        # on a CPU device the "copy" returns the buffer itself: a fresh one per step keeps the steps apart
        self.staging = PinnedStaging(self.device) if self.device.type == "cuda" else None
        self.slot_temperature = np.zeros(self.max_slots, dtype=np.float32)  # 0: greedy
        self.slot_temperature_only = np.zeros(self.max_slots, dtype=bool)
        self._gpu_memory = (0, 0)
        self._gpu_memory_read = -math.inf
        self._unresolved: deque[PendingStep] = deque()
        self.profiler = StepProfiler()
        self.num_steps = 0
        self.loop_time: LoopTime | None = None  # the worker process's, charged with each phase of a step

        self.plan = self._plan_memory()
        kv_block_bytes = self.plan.kv_block_bytes
        num_cpu_blocks = int(config.cpu_kv_cache_gib * GIB) // kv_block_bytes if self.device.type == "cuda" else 0
        if config.preemption_mode == "swap" and self.device.type == "cpu":
            num_cpu_blocks = self.plan.num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.kv_cache = KVCache(model_config.num_layers, self.plan.num_blocks, self.block_size,
                                model_config.num_kv_heads, model_config.head_dim, self.dtype, self.device,
                                num_cpu_blocks)
        self.backend = create_attention_backend(config.attention_backend, self.device, self.kv_cache,
                                                model_config)
        logger.info("memory layout:\n%s", self.plan.layout())
        self.graph_runner: DecodeGraphRunner | None = None
        if self.device.type == "cuda":
            self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        if self.device.type == "cuda" and not config.disable_cuda_graph and self.backend.supports_cuda_graphs:
            self.graph_runner = DecodeGraphRunner(self.model, self.backend, self.device,
                                                  min(config.cuda_graph_max_bs, self.max_slots),
                                                  self.max_context_length, self.block_size, self._decode_kv_splits,
                                                  self.last_tokens, self.padding_slot, config.seed)
            self.graph_runner.capture()

    # ---- memory -------------------------------------------------------------------------

    def _kv_block_bytes(self) -> int:
        c = self.source.config
        return KVCache.bytes_per_block(c.num_layers, self.block_size, c.num_kv_heads, c.head_dim, self.dtype)

    def _plan_memory(self) -> MemoryPlan:
        block_bytes = self._kv_block_bytes()
        min_blocks = math.ceil(self.max_context_length / self.block_size)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.config.num_kv_blocks:
            return MemoryPlan(0, 0, weights, 0, 0, 0, block_bytes,
                              max(self.config.num_kv_blocks, min_blocks), self.block_size)
        if self.device.type == "cpu":
            return plan_cpu_memory(self.config.cpu_kv_cache_gib, block_bytes, self.block_size, weights, min_blocks)
        activation = self._profile_activation_bytes()
        graph_reserve = 0 if self.config.disable_cuda_graph else self._graph_reserve_bytes()
        return plan_gpu_memory(self.device, self.config.mem_fraction, weights, activation, graph_reserve,
                               block_bytes, self.block_size, min_blocks)

    def _graph_reserve_bytes(self) -> int:
        # the graphs share one pool whose size is about one decode batch's activations at the largest size
        c = self.source.config
        batch = min(self.config.cuda_graph_max_bs, self.max_slots)
        per_token = (c.hidden_size * 4 + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                     + 2 * c.intermediate_size) * self.dtype.itemsize + c.vocab_size * 4 * 2
        return batch * per_token + 256 * 1024**2

    def _profile_activation_bytes(self) -> int:
        """Peak memory of the largest prefill step, measured with a throwaway KV cache."""
        c = self.source.config
        num_tokens = min(self.config.max_running_tokens, self.max_context_length)
        blocks = math.ceil(num_tokens / self.block_size)
        scratch = KVCache(c.num_layers, blocks, self.block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device)
        backend = create_attention_backend(self.config.attention_backend, self.device, scratch, c, quiet=True)
        num_sampled = min(self.max_slots, num_tokens)
        batch = ForwardBatch(step_id=-1, slots=[0], num_new_tokens=[num_tokens], context_lens=[num_tokens],
                             input_token_ids=[1] * num_tokens, block_tables=[list(range(blocks))], sample=[True])
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            inputs = build_step_inputs(batch, self.block_size, self.last_tokens, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, backend, inputs.meta)
            logits = self.model.compute_logits(hidden[-num_sampled:])
            params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * num_sampled
            self.sampler(logits, SamplingInputs.build(params, [0] * num_sampled, c.vocab_size, self.device))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del scratch, backend, hidden, logits
        torch.cuda.empty_cache()
        return peak

    # ---- steps --------------------------------------------------------------------------

    def execute(self, batch: ForwardBatch) -> PendingStep:
        started = time.perf_counter()
        self.profiler.step()
        self.num_steps += 1
        with torch.inference_mode():
            with nvtx_range("prepare"):
                self.kv_cache.swap_out(batch.swap_out)
                self.kv_cache.swap_in(batch.swap_in)
                for seq in batch.new_sequences:
                    self._set_slot(seq.slot, SlotState(seq.params, seq.prompt_token_ids, list(seq.output_token_ids)))
                graph = self.graph_runner is not None and self.graph_runner.can_run(batch)
                if graph:
                    self.graph_runner.stage(batch, self.slot_temperature[batch.slots])
                elif batch.slots:
                    inputs = build_step_inputs(batch, self.block_size, self.last_tokens, self.device, self.staging)
            self._lap("prepare" if graph else "eager prepare")
            if not batch.slots:
                pending = PendingStep(self, batch.step_id, None, [], [], started)
            elif graph:
                pending = self._replay_graph(batch, started)
            else:
                pending = self._run_eager(batch.step_id, inputs, started)
        # every step, sampled or not, resolves in launch order
        self._unresolved.append(pending)
        return pending

    def _run_eager(self, step_id: int, inputs: StepInputs, started: float) -> PendingStep:
        """Any step (prefill chunks, mixed, or decode beyond the captured sizes), op by op."""
        with nvtx_range("forward"):
            hidden = self._forward(inputs)
        self._lap("eager forward")
        if not inputs.sample_slots_host:
            return PendingStep(self, step_id, None, [], [], started)
        with nvtx_range("sample"):
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
            states = [self.slots[s] for s in inputs.sample_slots_host]
            output = self.sampler(logits, self._sampling_inputs(states, inputs.sample_positions))
            self.last_tokens[inputs.sample_slots] = output.token_ids
            pending = PendingStep(self, step_id, output, inputs.sample_slots_host, [s.params.logprobs for s in states],
                                  started)
        self._lap("eager sample")
        return pending

    def _replay_graph(self, batch: ForwardBatch, started: float) -> PendingStep:
        """A staged decode step as one captured graph; the eager sampler redraws the rows that need more
        than a temperature, from the graph's logits."""
        with nvtx_range("forward"):
            tokens, logits = self.graph_runner.replay(len(batch.slots))
        self._lap("forward")
        with nvtx_range("sample"):
            if self.slot_temperature_only[batch.slots].all():  # no row asked for logprobs either
                output, logprob_counts = SamplerOutput(tokens, None, None, None), [None] * len(batch.slots)
            else:
                states = [self.slots[s] for s in batch.slots]
                output = self.sampler(logits, self._sampling_inputs(states, batch.context_lens))
                self.last_tokens[self.graph_runner.inputs.device_views["slots"][:len(states)]] = output.token_ids
                logprob_counts = [s.params.logprobs for s in states]
            pending = PendingStep(self, batch.step_id, output, batch.slots, logprob_counts, started)
        self._lap("sample")
        return pending

    def _lap(self, phase: str) -> None:
        if self.loop_time is not None:
            self.loop_time.lap(phase)

    def _set_slot(self, slot: int, state: SlotState) -> None:
        self.slots[slot] = state
        self.slot_temperature[slot] = 0.0 if state.params.greedy else state.params.temperature
        self.slot_temperature_only[slot] = temperature_only(state.params, self.source.config.vocab_size)

    def gpu_memory(self) -> tuple[int, int]:
        """(allocated, reserved) bytes on the GPU, read at most every GPU_MEMORY_REFRESH_S."""
        now = time.monotonic()
        if self.device.type == "cuda" and now - self._gpu_memory_read >= GPU_MEMORY_REFRESH_S:
            self._gpu_memory = (torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device))
            self._gpu_memory_read = now
        return self._gpu_memory

    def _decode_kv_splits(self, batch_size: int) -> int | None:
        """Split-KV partitions for a decode batch: the same for a batch and the graph it is padded to."""
        if self.device.type != "cuda" or self.backend.name != "triton":
            return None
        from kernels import choose_num_kv_splits
        if self.graph_runner is not None and batch_size <= self.graph_runner.max_batch_size:
            batch_size = self.graph_runner.padded_size(batch_size)
        return choose_num_kv_splits(batch_size, self.source.config.num_kv_heads, self.max_context_length,
                                    self._num_sms)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.meta.is_decode:
            inputs.meta.num_kv_splits = self._decode_kv_splits(inputs.meta.batch_size)
        self.backend.prepare(inputs.meta)
        return self.model(inputs.input_ids, inputs.positions, self.backend, inputs.meta)

    def _sampling_inputs(self, states: list[SlotState], positions: list[int]) -> SamplingInputs:
        params = [s.params for s in states]
        penalty_tokens = None
        if any(p.has_penalties for p in params):
            # penalties read the previous steps' tokens: those results must be in first
            self.resolve_all()
            penalty_tokens = [(s.prompt_token_ids, s.output_token_ids) if s.params.has_penalties else ([], [])
                              for s in states]
        return SamplingInputs.build(params, positions, self.source.config.vocab_size, self.device, penalty_tokens)

    def resolve_through(self, pending: PendingStep) -> None:
        """Resolves launched steps in launch order up to `pending` (penalties need that order); every
        step joins the queue when it is launched."""
        while True:
            step = self._unresolved.popleft()
            step.resolve()
            if step is pending:
                return

    def resolve_all(self) -> None:
        while self._unresolved:
            self._unresolved.popleft().resolve()

    def record_outputs(self, slots: list[int], token_ids: list[int]) -> None:
        for slot, token in zip(slots, token_ids):
            state = self.slots[slot]
            if state is not None and state.params.has_penalties:
                state.output_token_ids.append(token)
