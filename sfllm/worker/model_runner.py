"""Executes ForwardBatches on the model: the worker's whole job, without the sockets.

`execute` only launches device work; its `PendingStep` joins one queue in launch order, and
`next_result` hands the results back in that order once their tokens are on the host, so the next
step can be launched before the previous one has finished.

A step the engine lets the worker hold (`ForwardBatch.hold_s`) is staged at once and deferred: launched by
`launch_due` once its hold is over or every step before it has finished, or before any later message's step
but an urgent one, which goes before it. A graph step deferred behind an urgent graph step has its inputs
staged again at launch: there is one input buffer for every graph.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from sfllm.bad_words import banned_next_tokens
from sfllm.config import WorkerConfig, num_sequence_slots
from sfllm.loop_time import LoopTime
from sfllm.messages import ForwardBatch, ForwardResult, GrammarMask, SampledLogprobs
from sfllm.model_source import ModelSource
from sfllm.nvtx import nvtx_range
from sfllm.sampling_params import SamplingParams
from sfllm.worker.attention.registry import create_attention_backend
from sfllm.worker.block_tables import BlockTables
from sfllm.worker.cuda_graph_runner import CudaGraphRunner, speculative_graph_sizes
from sfllm.worker.eager_step import EagerStep
from sfllm.worker.kv_cache import KVCache
from sfllm.worker.kv_splits import KVSplits
from sfllm.worker.memory_planner import decode_graph_limit, plan_memory
from sfllm.worker.model_shard import ModelShard
from sfllm.worker.pending_step import PendingStep
from sfllm.worker.prompt_logprobs import prompt_token_logprobs
from sfllm.worker.sampler import TOP_K_BOUND, Sampler, SamplingInputs, temperature_only, to_device
from sfllm.worker.step_inputs import StepShape, StepStaging
from sfllm.worker.step_profiler import StepProfiler
from sfllm.worker.tensor_parallel import TensorParallelGroup
from sfllm.worker.token_mask import TokenBitmasks, packed_token_set
from sfllm.worker.weight_loader import load_model

logger = logging.getLogger(__name__)

GPU_MEMORY_REFRESH_S = 1.0  # reading the allocator's statistics costs ~100s of us: not on every step

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DeviceUnavailable(RuntimeError):
    """The device the configuration asks for is not there."""


def pick_device(name: str, rank: int = 0, size: int = 1) -> torch.device:
    """The device of tensor-parallel rank `rank` of `size`: GPU `rank`, or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailable("--device cuda was asked for, but torch sees no CUDA device")
    if size > torch.cuda.device_count():
        raise DeviceUnavailable(f"--tensor-parallel-size {size} needs {size} GPUs, one per rank, but torch sees "
                           f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    return torch.device("cuda", rank)


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
    allowed_tokens: np.ndarray | None = None  # params.allowed_token_ids packed as a bitmask row, once


@dataclass
class StagedStep:
    """A step whose host work is done, ready to launch: its graph's inputs copied (`shape`; None: eager)."""
    batch: ForwardBatch
    started: float
    staging_s: float
    shape: StepShape | None
    num_sampled: int
    # every slot's state as of this step: a slot freed while the step is in flight may be the next request's by
    # the time its tokens are drawn or recorded
    slot_states: list[SlotState | None]


@dataclass
class StepLogits:
    """A launched step up to its sampled rows' logits: what sampling starts from, now or once the step's
    grammar mask is in."""
    batch: ForwardBatch
    started: float
    slot_states: list[SlotState | None]  # as StagedStep's
    sampled_slots: list[int]         # [N]: each sampled row's sequence slot (a speculating one has 1 + k rows)
    logits: torch.Tensor | None      # [N, V] of the N sampled rows
    slots: torch.Tensor | None       # [N]: their slots, where their tokens go in `last_tokens`
    tokens: torch.Tensor | None      # [N]: the graph's draws; None where the eager sampler draws every row
    redraw: list[int]                # rows the eager sampler draws
    prompt_logprobs: list[list[SampledLogprobs]] = field(default_factory=list)
    launch_time_s: float = 0.0       # host time from taking the step in to launching its forward


def sampled_row_slots(batch: ForwardBatch) -> list[int]:
    """The slot of each sampled row: a sampled sequence's, once per row it has (1 + its drafts)."""
    rows = iter(batch.sampled_rows())
    return [slot for slot, sample in zip(batch.slots, batch.sample) if sample for _ in range(next(rows))]


def sampled_row_positions(batch: ForwardBatch) -> list[int]:
    """The position of the token each sampled row draws (what seeded sampling hashes): a row of k drafts
    draws positions context_len - k .. context_len."""
    drafts = batch.num_draft_tokens or [0] * len(batch.slots)
    return [n - k + i for n, k, sample in zip(batch.context_lens, drafts, batch.sample) if sample
            for i in range(k + 1)]


def draft_tokens(batch: ForwardBatch) -> list[list[int]] | None:
    """Each sampled sequence's drafts (the last of its new tokens), or None when the batch has none."""
    if not batch.num_draft_tokens:
        return None
    ends = np.cumsum(batch.num_new_tokens).tolist()
    return [batch.input_token_ids[end - k:end] for end, k, sample in zip(ends, batch.num_draft_tokens, batch.sample)
            if sample]


class ModelRunner:
    def __init__(self, config: WorkerConfig, source: ModelSource, group: TensorParallelGroup | None = None) -> None:
        """The whole model on one device, or with `group` this rank's part of it; every rank runs every step
        (with the same inputs, the same decisions and the same collectives) and samples the same tokens."""
        self.config = config
        self.source = source
        model_config = source.config
        self.group = group or TensorParallelGroup(0, 1, pick_device(config.device))
        self.shard = ModelShard.of(model_config, self.group.rank, self.group.size)
        self.device = self.group.device
        self.dtype = pick_dtype(config.dtype, model_config.torch_dtype, self.device)
        if self.device.type == "cpu":
            # All cores by default, shared by the ranks: the frontend and scheduler mostly wait while a step
            # computes. On a machine busy with other work, fewer threads avoid an OpenMP team stalling on a
            # preempted member (seen: a small matmul at 2.7 ms with 2 threads, 16 us with 1).
            torch.set_num_threads(config.cpu_threads or max(len(os.sched_getaffinity(0)) // self.group.size, 1))
        else:
            torch.cuda.set_device(self.device)
        rank = f" (tensor-parallel rank {self.group.rank} of {self.group.size})" if self.group.size > 1 else ""
        logger.info("device %s, dtype %s (--dtype %s)%s", self.device, str(self.dtype).removeprefix("torch."),
                    config.dtype, rank)
        self.max_context_length = min(config.max_context_length or model_config.max_position_embeddings,
                                      model_config.max_position_embeddings)
        if config.max_context_length is not None and config.max_context_length > self.max_context_length:
            logger.warning("max_context_length %d is past the model's %d positions (max_position_embeddings): "
                           "serving %d", config.max_context_length, self.max_context_length, self.max_context_length)
        self.block_size = config.block_size
        self.model = load_model(source, self.dtype, self.device, self.max_context_length, config.seed, self.shard,
                                self.group)
        self.group.wait_for_all("weights loaded")
        self.max_slots = num_sequence_slots(config)
        self.sampler = Sampler(config.seed)
        self.token_bitmasks = TokenBitmasks(model_config.vocab_size, self.device)
        # one spare row past the slots: padding rows of a captured step write their token there
        self.last_tokens = torch.zeros(self.max_slots + 1, dtype=torch.int64, device=self.device)
        self.block_tables = BlockTables(self.max_slots, math.ceil(self.max_context_length / self.block_size),
                                        self.block_size, self.device)
        self.slots: list[SlotState | None] = [None] * self.max_slots
        self.slot_temperature = np.zeros(self.max_slots + 1, dtype=np.float32)  # 0: greedy
        self.slot_temperature_only = np.zeros(self.max_slots + 1, dtype=bool)
        self._gpu_memory = (0, 0)
        self._gpu_memory_read = -math.inf
        self._launched: deque[PendingStep] = deque()
        self._awaiting_mask: StepLogits | None = None  # launched, sampling once its GrammarMask is in
        self._held: StagedStep | None = None  # staged behind _awaiting_mask, launched after its sampling
        # staged with a hold (see the module's docstring); only where `may_defer` (a GPU worker in its own
        # process without other ranks, whose loop calls `launch_due`)
        self._deferred: StagedStep | None = None
        self._deferred_until = 0.0  # time.perf_counter()
        self._deferred_inputs_stale = False  # an urgent graph step overwrote its staged inputs
        self.may_defer = False
        self.num_urgent_first = 0  # urgent steps launched before a deferred step
        self._num_resolved = 0  # leading steps of _launched whose results are packed and recorded
        self.profiler = StepProfiler()
        self.num_steps = 0
        self.loop_time: LoopTime | None = None  # the worker process's, charged with each phase of a step

        graphs = self.device.type == "cuda" and not config.disable_cuda_graph
        # the ranks must capture the same graphs and plan the same KV pool: each sizes its own, the smallest wins
        self.decode_graph_batch = self.group.min(decode_graph_limit(config, self.device)) if graphs else 0
        self.plan = plan_memory(config, model_config, self.model, self.device, self.dtype, self.max_context_length,
                                graphs)
        self.plan.agree(self.group.min(self.plan.num_blocks), self.group.min(self.plan.num_cpu_blocks))
        self.num_cpu_blocks = self.plan.num_cpu_blocks
        self.kv_cache = KVCache(model_config.num_layers, self.plan.num_blocks, self.block_size,
                                self.shard.num_kv_heads, model_config.head_dim, self.dtype, self.device,
                                self.num_cpu_blocks)
        self.backend = create_attention_backend(config.attention_backend, self.device, self.kv_cache, self.shard)
        kv_splits = KVSplits(self.backend.name, self.shard.num_kv_heads, self.max_context_length, self.device)
        self.eager = EagerStep(self.model, self.backend, self.block_tables, self.last_tokens, kv_splits,
                               StepStaging(self.device))
        self.graph_runner: CudaGraphRunner | None = None
        if graphs and self.backend.supports_cuda_graphs:
            self.graph_runner = CudaGraphRunner(self.model, self.backend, self.block_tables, self.last_tokens,
                                                kv_splits, self.device, self.decode_graph_batch,
                                                config.max_running_tokens, self.max_slots, config.seed,
                                                *speculative_graph_sizes(config))
            self.graph_runner.capture()
            self.plan.graph_bytes = self.graph_runner.capture_bytes
            self.plan.graph_note = (f"decode steps of 1..{self.graph_runner.max_decode_batch} sequences, mixed "
                                    f"steps of up to {self.graph_runner.mixed_sizes[-1]} tokens")
        if self.device.type == "cuda":
            from sfllm.kernels import warm_up_draw_top_tokens, warm_up_sample_tokens, warm_up_top_k_select
            warm_up_sample_tokens(model_config.vocab_size, self.shard.padded_vocab_size, self.dtype, self.device)
            if model_config.vocab_size > TOP_K_BOUND:  # the sampler's bounded rows: sfllm.worker.sampler
                warm_up_top_k_select(model_config.vocab_size, self.shard.padded_vocab_size, self.dtype, self.device,
                                     TOP_K_BOUND)
                warm_up_draw_top_tokens(TOP_K_BOUND, self.device)
        logger.info("memory layout%s:\n%s", rank, self.plan.layout())
        self.group.wait_for_all("ready")  # no rank's first step waits in a collective for another's last allocation

    # ---- steps --------------------------------------------------------------------------

    def take(self, message: ForwardBatch | GrammarMask) -> list[PendingStep]:
        """A step message from the scheduler (rank 0 relays the same to every rank): `execute` a step, or
        `apply_grammar_mask` to the one that waits for its mask. Returns the steps it launched."""
        if isinstance(message, ForwardBatch) and message.urgent and self._deferred is not None:
            staged = self._stage(message)
            self._deferred_inputs_stale |= staged.shape is not None
            self.num_urgent_first += 1
            return self._launch_staged(staged)
        launched = self._launch_deferred() if self._deferred is not None else []
        if isinstance(message, ForwardBatch):
            return launched + self.execute(message)
        return launched + self.apply_grammar_mask(message)

    def launch_due(self, now: float) -> list[PendingStep]:
        """Launches the deferred step if its hold is over or the steps before it have all finished."""
        if self._deferred is None:
            return []
        if now < self._deferred_until and self._launched and not self._launched[-1].ready():
            return []
        return self._launch_deferred()

    def seconds_until_due(self, now: float) -> float | None:
        """Until the deferred step's hold is over (None: none is deferred)."""
        return None if self._deferred is None else max(self._deferred_until - now, 0.0)

    def _launch_deferred(self) -> list[PendingStep]:
        self._lap("waiting")  # (the hold: not the launch's time)
        staged, self._deferred = self._deferred, None
        if self._deferred_inputs_stale and staged.shape is not None:
            with torch.inference_mode():
                self.graph_runner.stage(staged.batch, staged.shape, self.slot_temperature)
        self._deferred_inputs_stale = False
        return self._launch_staged(staged)

    def execute(self, batch: ForwardBatch) -> list[PendingStep]:
        """Launches the step; its result comes from `next_result`, after those of earlier steps. Nothing is
        launched when its sampling waits for the grammar mask that follows it (`apply_grammar_mask` launches
        it then), nor when it comes while the step before waits for its mask: the engine sends step N+1
        before step N's mask, so that N+1 is staged by the time the mask is in, and launched right after
        N's sampling (its forward reads N's tokens)."""
        if self._held is not None:
            raise RuntimeError(f"step {batch.step_id} arrived while step {self._held.batch.step_id} waits for the "
                               f"grammar mask of step {self._awaiting_mask.batch.step_id}")
        staged = self._stage(batch)
        if self._awaiting_mask is not None:
            if staged.batch.grammar_mask:  # a view of the scheduler's buffer, which the next mask overwrites
                staged.batch.grammar_mask = memoryview(bytes(staged.batch.grammar_mask))
            self._held = staged
            return []
        # (the step before still running: a step launched into an idle device gains nothing by waiting)
        if batch.hold_s > 0 and self.may_defer and self._launched and not self._launched[-1].ready():
            self._deferred = staged
            self._deferred_until = staged.started + batch.hold_s
            return []
        return self._launch_staged(staged)

    def apply_grammar_mask(self, message: GrammarMask) -> list[PendingStep]:
        """Samples the step that waited for this mask, then launches the step held behind it, if any; their
        results queue behind the earlier steps'."""
        step = self._awaiting_mask
        if step is None or step.batch.step_id != message.step_id:
            raise RuntimeError(f"a grammar mask for step {message.step_id} arrived, but no step waits for one")
        self._awaiting_mask = None
        with torch.inference_mode():
            pending = self._sample(step, message.bitmask)
        self._launch(pending)
        if self._held is None:
            return [pending]
        staged, self._held = self._held, None
        return [pending, *self._launch_staged(staged)]

    def _stage(self, batch: ForwardBatch) -> StagedStep:
        """A step's host work before its launch: swaps, block-table updates, new sequences' slots and, for a
        graph step, its inputs copied into the graphs' buffer (in stream order: a step launched before reads
        its own, already copied)."""
        started = time.perf_counter()
        self.profiler.step()
        self.num_steps += 1
        with torch.inference_mode(), nvtx_range("prepare"):
            self.kv_cache.swap_out(batch.swap_out)
            self.kv_cache.swap_in(batch.swap_in)
            self.block_tables.apply(batch.block_table_updates)
            for seq in batch.new_sequences:
                allowed = seq.params.allowed_token_ids
                self._set_slot(seq.slot, SlotState(seq.params, seq.prompt_token_ids, list(seq.output_token_ids),
                                                   None if allowed is None else
                                                   packed_token_set(allowed, self.source.config.vocab_size)))
            # prompt logprobs need every position's hidden state, which only the eager step keeps
            graph = self.graph_runner is not None and not batch.prompt_logprobs
            shape = self.graph_runner.shape_for(batch) if graph and batch.slots else None
            num_sampled = self.graph_runner.stage(batch, shape, self.slot_temperature) if shape is not None else 0
        self._lap("prepare" if shape is not None else "eager prepare")
        return StagedStep(batch, started, time.perf_counter() - started, shape, num_sampled, list(self.slots))

    def _launch_staged(self, staged: StagedStep) -> list[PendingStep]:
        batch = staged.batch
        launch_started = time.perf_counter()
        with torch.inference_mode():
            sampled_slots = sampled_row_slots(batch)
            if not batch.slots:
                step = None
            elif staged.shape is not None:
                step = self._replay_graph(staged, sampled_slots)
            else:
                step = self._run_eager(staged, sampled_slots)
            launch_time_s = staged.staging_s + time.perf_counter() - launch_started
            if step is None:
                pending = PendingStep(batch.step_id, staged.started, [], None)
                pending.launch_time_s = launch_time_s
            elif batch.grammar_rows and not batch.grammar_mask:
                step.launch_time_s = launch_time_s
                self._awaiting_mask = step
                return []
            else:
                step.launch_time_s = launch_time_s
                pending = self._sample(step, batch.grammar_mask)
        self._launch(pending)
        return [pending]

    def _run_eager(self, staged: StagedStep, sampled_slots: list[int]) -> StepLogits | None:
        batch = staged.batch
        prompt_logprobs: list[list[SampledLogprobs]] = []
        with nvtx_range("forward"):
            if batch.prompt_logprobs:
                every_hidden, tensors = self.eager.hidden_states(batch, self.slot_temperature)
                prompt_logprobs = prompt_token_logprobs(self.model, batch, every_hidden)
                hidden = every_hidden.index_select(0, tensors.logits_indices[:len(sampled_slots)])
            else:
                hidden, tensors = self.eager.forward(batch, self.slot_temperature)
        self._lap("eager forward")
        if not sampled_slots:
            if not prompt_logprobs:
                return None
            return StepLogits(batch, staged.started, staged.slot_states, [], None, None, None, [], prompt_logprobs)
        logits = self.model.compute_logits(hidden)
        return StepLogits(batch, staged.started, staged.slot_states, sampled_slots, logits,
                          tensors.sample_slots[:len(sampled_slots)], None, list(range(len(sampled_slots))),
                          prompt_logprobs)

    def _replay_graph(self, staged: StagedStep, sampled_slots: list[int]) -> StepLogits:
        """A staged step as one captured graph; the eager sampler redraws, from the graph's logits, only the
        rows that need more than a temperature."""
        batch = staged.batch
        with nvtx_range("forward"):
            tokens, logits, slots = self.graph_runner.replay(staged.shape, staged.num_sampled)
            if batch.grammar_rows and not batch.grammar_mask:
                slots = slots.clone()  # a view of the graphs' inputs, which the step held behind this one restages
        self._lap("forward")
        redraw = [row for row, slot in enumerate(sampled_slots) if not self.slot_temperature_only[slot]]
        return StepLogits(batch, staged.started, staged.slot_states, sampled_slots, logits, slots, tokens, redraw)

    def _sample(self, step: StepLogits, grammar_mask: memoryview) -> PendingStep:
        """The step's tokens: the graph's, with the rows in `step.redraw` drawn by the eager sampler (after
        the grammar mask, logit bias, penalties, top-k/p...)."""
        batch = step.batch
        drafts = draft_tokens(batch)
        if not step.redraw:
            pending = PendingStep(batch.step_id, step.started, step.sampled_slots, drafts, step.tokens,
                                  prompt_logprobs=step.prompt_logprobs)
            pending.slot_states = [step.slot_states[slot] for slot in pending.sequence_slots]
            pending.launch_time_s = step.launch_time_s
            self._lap("sample")
            return pending
        with nvtx_range("sample"):
            states = [step.slot_states[step.sampled_slots[row]] for row in step.redraw]
            positions = sampled_row_positions(batch)
            bitmask = self.token_bitmasks.bitmask(grammar_mask, batch.grammar_rows, step.redraw,
                                                  [state.allowed_tokens for state in states])
            unending = None
            if batch.min_tokens_rows:
                short = set(batch.min_tokens_rows)
                unending = [row in short for row in step.redraw]
            inputs = self._sampling_inputs(states, [positions[row] for row in step.redraw], bitmask, unending)
            tokens = step.tokens
            if len(step.redraw) == len(step.sampled_slots):
                output = self.sampler(step.logits, inputs, out=tokens)
                tokens = output.token_ids
                self.last_tokens.index_copy_(0, step.slots, output.token_ids)
            else:
                rows = to_device(step.redraw, torch.int64, self.device)
                output = self.sampler(step.logits.index_select(0, rows), inputs)
                tokens.index_copy_(0, rows, output.token_ids)
                self.last_tokens.index_copy_(0, step.slots.index_select(0, rows), output.token_ids)
            pending = PendingStep(batch.step_id, step.started, step.sampled_slots, drafts, tokens, output,
                                  step.redraw, [s.params.logprobs for s in states], step.prompt_logprobs)
            pending.slot_states = [step.slot_states[slot] for slot in pending.sequence_slots]
            pending.launch_time_s = step.launch_time_s
        self._lap("sample" if step.tokens is not None else "eager sample")
        return pending

    def _lap(self, phase: str) -> None:
        if self.loop_time is not None:
            self.loop_time.lap(phase)

    def _set_slot(self, slot: int, state: SlotState) -> None:
        self.slots[slot] = state
        self.slot_temperature[slot] = 0.0 if state.params.greedy else state.params.temperature
        self.slot_temperature_only[slot] = temperature_only(state.params, self.source.config.vocab_size)

    def _sampling_inputs(self, states: list[SlotState], positions: list[int],
                         token_bitmask: torch.Tensor | None = None,
                         unending: list[bool] | None = None) -> SamplingInputs:
        """`unending`: per row, whether its request is short of min_tokens (its ending tokens are masked)."""
        params = [s.params for s in states]
        if any(p.reads_output_tokens for p in params):
            # penalties and bad words of several tokens read the previous steps' tokens: those results first
            self.resolve_all()
        penalty_tokens = None
        if any(p.has_penalties for p in params):
            penalty_tokens = [(s.prompt_token_ids, s.output_token_ids) if s.params.has_penalties else ([], [])
                              for s in states]
        banned = None
        short = unending or [False] * len(states)
        if any(short) or any(p.bad_words_token_ids for p in params):
            eos = list(self.source.config.eos_token_ids)
            banned = [(p.stop_token_ids + eos if unended else []) + banned_next_tokens(p.bad_words_token_ids,
                                                                                        s.output_token_ids)
                      for p, s, unended in zip(params, states, short)]
        return SamplingInputs.build(params, positions, self.source.config.vocab_size, self.device, penalty_tokens,
                                    token_bitmask, banned)

    # ---- results ------------------------------------------------------------------------

    def next_result(self, wait: bool) -> ForwardResult | None:
        """The oldest launched step's result, or None if there is none (or, without `wait`, it is not on
        the host yet)."""
        if not self._launched or not (wait or self._launched[0].ready()):
            return None
        # taken off the queue only once its result is built: a wait cut short (the offline caller's Ctrl-C) leaves
        # the step to be asked for again
        step = self._launched[0]
        if self._num_resolved:
            result = step.result(self._gpu_memory)
            self._num_resolved -= 1
        else:
            result = self._resolve(step)
        self._launched.popleft()
        return result

    def resolve_all(self) -> None:
        """Packs every launched step's result and records its tokens (penalties and bad words need them), in
        order."""
        while self._num_resolved < len(self._launched):
            self._resolve(self._launched[self._num_resolved])
            self._num_resolved += 1

    def _resolve(self, step: PendingStep) -> ForwardResult:
        result = step.result(self.gpu_memory())
        emitted = result.accepted_token_ids or [[token] for token in result.token_ids]
        for state, tokens in zip(step.slot_states, emitted):
            if state is not None and state.params.reads_output_tokens:
                state.output_token_ids.extend(tokens)
        return result

    def _launch(self, pending: PendingStep) -> None:
        self._launched.append(pending)

    def unfinished_step_age(self) -> float:
        """Seconds since the oldest launched step whose outputs are not on the host yet was launched (0: none);
        called from the tensor-parallel watch's thread."""
        now = time.perf_counter()
        return max((now - step.started for step in list(self._launched) if not step.ready()), default=0.0)

    def gpu_memory(self) -> tuple[int, int]:
        """(allocated, reserved) bytes on the GPU, read at most every GPU_MEMORY_REFRESH_S."""
        now = time.monotonic()
        if self.device.type == "cuda" and now - self._gpu_memory_read >= GPU_MEMORY_REFRESH_S:
            self._gpu_memory = (torch.cuda.memory_allocated(self.device), torch.cuda.memory_reserved(self.device))
            self._gpu_memory_read = now
        return self._gpu_memory
