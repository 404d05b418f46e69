"""Turns a step's logits into tokens, one row per sequence, each with its own settings.

Seeded rows draw their noise from a counter-based hash of (seed, position, token id),
so a seeded request samples the same tokens whatever else shares its batch and after
a preemption re-runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from sfllm.sampling_params import SamplingParams
from sfllm.worker.token_mask import apply_bitmask

_MASK32 = 0xFFFFFFFF
# A sampled row that keeps at most this many tokens (top_k) draws among its this many top columns (torch.topk on a
# CPU, sfllm.kernels.top_k_select on a GPU) instead of sorting the whole vocabulary: on a GPU the sort of [B, V]
# logits and the mask, softmax, cumsum and scatter over all of it are most of a top-k/p row's cost. The count is
# fixed, not the batch's largest top_k: which of tied logits make a row's top k is then the same whatever shares its
# batch, so a seeded row draws the same tokens.
TOP_K_BOUND = 256


@dataclass
class PenaltyInputs:
    repetition: torch.Tensor        # [B] float
    presence: torch.Tensor          # [B] float
    frequency: torch.Tensor         # [B] float
    seen_mask: torch.Tensor         # [B, V] bool: token in prompt or output
    output_counts: torch.Tensor     # [B, V] float: occurrences in the output


@dataclass
class LogitBias:
    rows: torch.Tensor      # [K] int64
    token_ids: torch.Tensor  # [K] int64
    values: torch.Tensor    # [K] float


@dataclass
class SamplingInputs:
    all_greedy: bool
    temperatures: torch.Tensor | None   # [B] float, 0 for greedy rows; None when all are greedy
    greedy: torch.Tensor | None         # [B] bool
    top_ks: torch.Tensor | None     # [B] int64, vocab size when off
    top_ps: torch.Tensor | None     # [B] float
    min_ps: torch.Tensor | None     # [B] float
    seeds: torch.Tensor | None      # [B] int64, -1 where unseeded
    positions: torch.Tensor | None  # [B] int64: position of the token being sampled
    penalties: PenaltyInputs | None
    max_logprobs: int               # -1: nobody asked
    logit_bias: LogitBias | None = None
    token_bitmask: torch.Tensor | None = None  # [B, ceil(V / 32)] int32: grammars' allowed tokens
    # [B] bool: the rows that draw among the TOP_K_BOUND top tokens (None: no row); `all_bounded`: every sampled one
    bounded_rows: torch.Tensor | None = None
    all_bounded: bool = False

    @classmethod
    def build(cls, params: list[SamplingParams], positions: list[int], vocab_size: int, device: torch.device,
              penalty_tokens: list[tuple[list[int], list[int]]] | None = None,
              token_bitmask: torch.Tensor | None = None,
              banned_tokens: list[list[int]] | None = None) -> SamplingInputs:
        """`banned_tokens`: per row, token ids it may not draw (a request short of its min_tokens: its ending
        tokens; its bad words' next tokens), given a logit of -inf with the logit bias."""
        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(values, dtype, device)

        greedy = [p.greedy for p in params]
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        penalties = None
        if penalty_tokens is not None:
            penalties = _penalty_inputs(params, penalty_tokens, vocab_size, device)
        logit_bias = None
        if banned_tokens or any(p.logit_bias for p in params):
            logit_bias = _logit_bias(params, device, banned_tokens)
        if all(greedy):
            # the common fast path: argmax needs no per-row tensors at all
            return cls(all_greedy=True, temperatures=None, greedy=None, top_ks=None, top_ps=None, min_ps=None,
                       seeds=None, positions=None, penalties=penalties,
                       max_logprobs=max(logprobs) if logprobs else -1, logit_bias=logit_bias,
                       token_bitmask=token_bitmask)
        top_ks = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        need_top_k = any(k < vocab_size for k, g in zip(top_ks, greedy) if not g)
        need_top_p = any(p.top_p < 1.0 for p, g in zip(params, greedy) if not g)
        need_min_p = any(p.min_p > 0.0 for p, g in zip(params, greedy) if not g)
        seeded = any(p.seed is not None for p in params)
        bounded = [not g and k <= TOP_K_BOUND < vocab_size for k, g in zip(top_ks, greedy)]
        return cls(
            all_greedy=False,
            temperatures=tensor([0.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            greedy=tensor(greedy, torch.bool),
            top_ks=tensor(top_ks, torch.int64) if need_top_k or need_top_p else None,
            top_ps=tensor([p.top_p for p in params], torch.float32) if need_top_k or need_top_p else None,
            min_ps=tensor([p.min_p for p in params], torch.float32) if need_min_p else None,
            seeds=tensor([-1 if p.seed is None else p.seed for p in params], torch.int64) if seeded else None,
            positions=tensor(positions, torch.int64) if seeded else None,
            penalties=penalties,
            max_logprobs=max(logprobs) if logprobs else -1,
            logit_bias=logit_bias,
            token_bitmask=token_bitmask,
            bounded_rows=tensor(bounded, torch.bool) if any(bounded) else None,
            all_bounded=all(b or g for b, g in zip(bounded, greedy)),
        )


def _logit_bias(params: list[SamplingParams], device: torch.device,
                banned_tokens: list[list[int]] | None = None) -> LogitBias:
    rows = [row for row, p in enumerate(params) for _ in p.logit_bias]
    token_ids = [token for p in params for token in p.logit_bias]
    values = [value for p in params for value in p.logit_bias.values()]
    for row, banned in enumerate(banned_tokens or []):
        rows += [row] * len(banned)
        token_ids += banned
        values += [float("-inf")] * len(banned)
    return LogitBias(to_device(rows, torch.int64, device), to_device(token_ids, torch.int64, device),
                     to_device(values, torch.float32, device))


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` on `device` without waiting for the GPU: a copy from pageable memory waits for every kernel
    queued before it (the driver syncs the stream), which would stall the host behind the step in flight;
    from pinned memory (PyTorch's cached pinned blocks) it is queued like a kernel."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def _penalty_inputs(params: list[SamplingParams], tokens: list[tuple[list[int], list[int]]], vocab_size: int,
                    device: torch.device) -> PenaltyInputs:
    batch = len(params)
    seen = torch.zeros(batch, vocab_size, dtype=torch.bool)
    counts = torch.zeros(batch, vocab_size, dtype=torch.float32)
    for row, (prompt, output) in enumerate(tokens):
        if prompt:
            seen[row, torch.tensor(prompt)] = True
        if output:
            out = torch.tensor(output)
            seen[row, out] = True
            counts[row].index_add_(0, out, torch.ones(len(output)))
    return PenaltyInputs(
        repetition=torch.tensor([p.repetition_penalty for p in params]).to(device),
        presence=torch.tensor([p.presence_penalty for p in params]).to(device),
        frequency=torch.tensor([p.frequency_penalty for p in params]).to(device),
        seen_mask=seen.to(device),
        output_counts=counts.to(device),
    )


def temperature_only(params: SamplingParams, vocab_size: int) -> bool:
    """Whether temperature alone decides the draw (greedy counts as temperature 0): what a captured
    decode step samples by itself (sfllm.worker.cuda_graph_runner)."""
    if (params.has_penalties or params.logprobs is not None or params.constrained or params.logit_bias
            or params.min_tokens or params.allowed_token_ids is not None or params.bad_words_token_ids):
        return False
    if params.greedy:
        return True
    return (params.seed is None and (params.top_k == -1 or params.top_k >= vocab_size) and params.top_p >= 1.0
            and params.min_p == 0.0)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                 # [B] int64
    logprobs: torch.Tensor | None           # [B] float: the chosen tokens'
    top_token_ids: torch.Tensor | None      # [B, K]
    top_logprobs: torch.Tensor | None       # [B, K]
    ranks: torch.Tensor | None = None       # [B] int64: the chosen tokens' (1: the likeliest)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._generators: dict[torch.device, torch.Generator] = {}
        self._noise_seeds: dict[torch.device, torch.Tensor] = {}
        self._kernels: ModuleType | None = None  # sfllm.kernels, once a GPU's draw needs it
        self._seed = seed

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def _noise_seed(self, device: torch.device) -> torch.Tensor:
        """The device counter keying the kernel's noise, one step on per draw; bit 31 set: never a seed of the
        captured graphs' counter (sfllm.worker.cuda_graph_runner), which counts up from the same seed."""
        if device not in self._noise_seeds:
            with torch.inference_mode(False):  # a normal tensor: advanced inside inference mode or out of it
                self._noise_seeds[device] = torch.tensor([((self._seed & 0x7FFFFFFF) << 32) | 1 << 31],
                                                         dtype=torch.int64, device=device)
        return self._noise_seeds[device]

    def __call__(self, logits: torch.Tensor, inputs: SamplingInputs, out: torch.Tensor | None = None
                 ) -> SamplerOutput:
        """logits: [B, V] from the model, float32 or the model's dtype; the tokens go into `out` [B] when given."""
        if inputs.max_logprobs >= 0 or inputs.penalties is not None or inputs.logit_bias is not None:
            logits = logits.float()  # once, for what reads or changes the values
        raw_logprobs = torch.log_softmax(logits, dim=-1) if inputs.max_logprobs >= 0 else None
        if inputs.penalties is not None:
            logits = _apply_penalties(logits, inputs.penalties)
        if inputs.logit_bias is not None:
            bias = inputs.logit_bias
            logits = logits.index_put((bias.rows, bias.token_ids), bias.values, accumulate=True)
        if logits.device.type == "cuda" and inputs.top_ks is None and inputs.min_ps is None and inputs.seeds is None:
            tokens = self._draw_with_kernel(logits, inputs, out)
        else:
            tokens = self._draw(logits, inputs)
            if out is not None:
                tokens = out.copy_(tokens)
        if raw_logprobs is None:
            return SamplerOutput(tokens, None, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        top_logprobs, top_ids = raw_logprobs.topk(max(inputs.max_logprobs, 1), dim=-1)
        ranks = (raw_logprobs > chosen[:, None]).sum(-1) + 1
        return SamplerOutput(tokens, chosen, top_ids, top_logprobs, ranks)

    def _gpu_kernels(self) -> ModuleType:
        if self._kernels is None:
            from sfllm import kernels  # Triton: only on a GPU
            self._kernels = kernels
        return self._kernels

    def _draw_with_kernel(self, logits: torch.Tensor, inputs: SamplingInputs, out: torch.Tensor | None
                          ) -> torch.Tensor:
        """Argmax or temperature, over a grammar's allowed tokens, in one pass over the logits (no masked or
        float32 copy of them): the same draw as `_draw`, in a launch or two instead of a dozen."""
        seed = self._noise_seed(logits.device)
        tokens = self._gpu_kernels().sample_tokens(logits, inputs.temperatures, seed, out=out,
                                                   bitmask=inputs.token_bitmask)
        if not inputs.all_greedy:
            seed.add_(1)
        return tokens

    def _top_tokens(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's TOP_K_BOUND largest logits (float32, descending) and their ids. On a GPU by a radix select
        that keeps the lowest ids of a tie and reads the logits in their own dtype; torch.topk's float32 copy and
        selection cost 100-650 us (docs/performance.md, thirty-fourth session)."""
        if logits.device.type != "cuda":
            return logits.float().topk(TOP_K_BOUND, dim=-1)
        return self._gpu_kernels().top_k_select(logits, TOP_K_BOUND)

    def _draw_from_top_tokens(self, values: torch.Tensor, token_ids: torch.Tensor, inputs: SamplingInputs
                              ) -> torch.Tensor:
        """The rest of a bounded draw in one kernel a step (the torch path below launches some forty); a greedy row
        takes its top token. Unseeded rows take the kernel's noise, keyed by the counter `_draw_with_kernel` uses."""
        seed = self._noise_seed(values.device)
        tokens = self._gpu_kernels().draw_top_tokens(values, token_ids, inputs.temperatures, inputs.top_ks,
                                                     inputs.top_ps, inputs.min_ps, inputs.seeds, inputs.positions,
                                                     seed)
        seed.add_(1)
        return tokens

    def _draw(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """logits in the model's dtype or float32: the bounded rows' selection reads them as they are, the rest
        of the draw is in float32."""
        if inputs.token_bitmask is not None:
            logits = apply_bitmask(logits, inputs.token_bitmask)
        if not inputs.all_greedy and inputs.all_bounded and logits.device.type == "cuda":
            # its greedy rows take their top token: the argmax
            return self._draw_from_top_tokens(*self._top_tokens(logits), inputs)
        tokens = logits.argmax(dim=-1)
        if not inputs.all_greedy:
            sampled = self._sample(logits, inputs)
            tokens = torch.where(inputs.greedy, tokens, sampled)
        return tokens

    def _sample(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        if inputs.bounded_rows is None:
            return self._race(logits, inputs, bounded=False)
        tokens = self._race(logits, inputs, bounded=True)
        if inputs.all_bounded:
            return tokens
        # rows of both kinds (rare): each row takes its own kind's draw
        return torch.where(inputs.bounded_rows, tokens, self._race(logits, inputs, bounded=False))

    def _race(self, logits: torch.Tensor, inputs: SamplingInputs, bounded: bool) -> torch.Tensor:
        """Every row's draw, among the TOP_K_BOUND top tokens if `bounded`, else the whole vocabulary."""
        token_ids = None  # the columns' tokens where bounded (sorted, descending)
        if bounded:  # before the temperature, which keeps the order: it then divides the columns kept alone
            logits, token_ids = self._top_tokens(logits)
            if logits.device.type == "cuda":
                return self._draw_from_top_tokens(logits, token_ids, inputs)
        else:
            logits = logits.float()
        temperatures = torch.where(inputs.greedy, torch.ones_like(inputs.temperatures), inputs.temperatures)
        logits = logits / temperatures[:, None]
        if token_ids is not None:
            logits = _top_k_top_p_sorted(logits, inputs.top_ks, inputs.top_ps)
        elif inputs.top_ks is not None:
            logits = _top_k_top_p(logits, inputs.top_ks, inputs.top_ps)
        probs = torch.softmax(logits, dim=-1)
        if inputs.min_ps is not None:
            threshold = inputs.min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self._generator(probs.device))
        if inputs.seeds is not None:
            seeded = inputs.seeds >= 0
            columns = token_ids if token_ids is not None else torch.arange(probs.shape[1], device=probs.device)[None]
            noise = torch.where(seeded[:, None], _seeded_exponential(inputs.seeds, inputs.positions, columns), noise)
        # exponential race: argmax(p / E) samples from p (a seeded row's noise is its tokens', whichever columns)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        return (choice if token_ids is None else token_ids.gather(1, choice)).squeeze(1)


def _apply_penalties(logits: torch.Tensor, p: PenaltyInputs) -> torch.Tensor:
    repetition = p.repetition[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(p.seen_mask, penalized, logits)
    logits = logits - p.frequency[:, None] * p.output_counts
    return logits - p.presence[:, None] * (p.output_counts > 0).float()


def _top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    return torch.empty_like(logits).scatter_(1, order, _top_k_top_p_sorted(sorted_logits, top_ks, top_ps))


def _top_k_top_p_sorted(sorted_logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Logits sorted descending (a row's leading columns, or all of them) with those top-k and top-p drop at -inf."""
    ranks = torch.arange(sorted_logits.shape[1], device=sorted_logits.device)
    masked = ranks[None, :] >= top_ks[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(masked, float("-inf")), dim=-1)
    # drop a token when the ones above it already reach top_p (the first is always kept)
    masked |= (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_ps[:, None]
    return sorted_logits.masked_fill(masked, float("-inf"))


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors holding values below 2**32."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def _seeded_exponential(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Each row's noise for `token_ids` ([1, V] or [B, K]): a function of (seed, position, token id) alone."""
    seeds = seeds.clamp(min=0)
    row_key = _hash32((seeds & _MASK32) ^ _hash32((seeds >> 32) & _MASK32))
    row_key = _hash32(row_key ^ (positions & _MASK32))
    bits = _hash32(_hash32(row_key[:, None] ^ token_ids) ^ row_key[:, None])
    uniform = (bits.double() + 0.5) / 2.0**32
    return (-torch.log(uniform)).float()
