"""The contract between sfllm's processes: every message that crosses a socket.

frontend <-> scheduler: hello, generate, abort, heartbeat/stats, profile control, goodbye, outputs.
scheduler <-> worker: worker ready, forward batch, forward result, shutdown.
All are msgspec structs, encoded as msgpack; a tagged union per direction lets the
receiver decode without guessing. `PROTOCOL_VERSION` changes whenever a struct does.
"""
from __future__ import annotations

import numbers
from typing import Literal, Union, get_args

import msgspec

from sfllm.sampling_params import SamplingParams

PROTOCOL_VERSION = 20

# The scheduling classes of a request, highest first.
Priority = Literal["high", "normal", "background"]
PRIORITIES: tuple[str, ...] = get_args(Priority)


def priority_class(priority: str | int) -> str:
    """The class of a priority given by name, or as vLLM's integer, where lower runs earlier: below 0 high, 0
    normal, above 0 background. (SGLang runs higher values earlier unless --schedule-low-priority-values-first.)"""
    if isinstance(priority, str) and priority in PRIORITIES:
        return priority
    if isinstance(priority, numbers.Integral) and not isinstance(priority, bool):
        return "high" if priority < 0 else "normal" if priority == 0 else "background"
    raise ValueError(f"priority is one of {', '.join(PRIORITIES)}, or an integer (below 0 high, 0 normal, above 0 "
                     f"background); got {priority!r}")


class Message(msgspec.Struct, tag=True, kw_only=True):
    pass


# ---- frontend -> scheduler -------------------------------------------------------------

class ClientHello(Message):
    protocol_version: int
    client_id: str


class GenerateRequest(Message):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: str = "normal"
    arrival_time: float = 0.0
    # vLLM's `cache_salt`: only requests of one salt share cached prefixes (tenants can't probe each other's)
    cache_salt: str | None = None


class AbortRequest(Message):
    request_ids: list[str]


class Heartbeat(Message):
    """Sent every heartbeat interval; the engine answers with `EngineStats`.

    A client whose heartbeats stop is gone: the engine aborts its requests."""
    client_id: str


class ClientGoodbye(Message):
    """A frontend stopping on purpose (drained, handed over): the engine forgets it at once, aborting what it
    left, rather than when its heartbeats stop."""
    client_id: str


class ProfileControl(Message):
    start: bool


class FlushPrefixCache(Message):
    """Forget every cached prefix (SGLang's /flush_cache, vLLM's /reset_prefix_cache): the requests that follow
    it from the same frontend find none; blocks in use stay with their requests."""


class Shutdown(Message):
    pass


# ---- scheduler -> frontend -------------------------------------------------------------

class TokenizerSpec(msgspec.Struct):
    """Everything a frontend needs to turn text into the model's token ids and back, without
    transformers: the engine reads it from the model folder (see sfllm/model_source/tokenizer_spec.py)."""
    # The `tokenizers` backend as transformers configures it (its post-processor adds BOS where the model wants).
    tokenizer_json: str
    chat_template: str | None
    # bos_token, eos_token, ...: named special tokens, which chat templates read as variables.
    special_tokens: dict[str, str]
    # The model's: ids in [0, vocab_size) are valid prompt tokens even where the tokenizer knows fewer.
    vocab_size: int


class SamplingDefaults(msgspec.Struct, frozen=True):
    """Values for the sampling fields a request leaves out, as the model's generation_config.json recommends them
    (vLLM's --generation-config auto; sfllm/model_source/generation_defaults.py); None: sfllm's own, OpenAI's."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None  # the budget of a request that names none (generation_config's max_new_tokens)

    def given(self) -> dict[str, float | int]:
        return {name: value for name in self.__struct_fields__ if (value := getattr(self, name)) is not None}


class EngineHello(Message):
    protocol_version: int
    model_name: str
    max_context_length: int
    eos_token_ids: list[int]
    num_kv_blocks: int
    block_size: int
    tokenizer: TokenizerSpec
    sampling_defaults: SamplingDefaults
    # the engine's limits, as SGLang's /get_server_info names them to its clients
    max_running_requests: int = 0
    max_running_tokens: int = 0
    tensor_parallel_size: int = 1
    prefix_cache: bool = True


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float


class SampledLogprobs(msgspec.Struct, array_like=True):
    """The chosen token's logprob and the top alternatives of one step."""
    logprob: float
    top: list[TokenLogprob]
    rank: int | None = None  # the chosen token's rank (1: the likeliest)


class RequestOutput(Message):
    """New tokens of one request since its previous output.

    `error` set means the engine refused or lost the request; `error_code` is the
    HTTP status the frontend should answer with."""
    request_id: str
    token_ids: list[int]
    logprobs: list[SampledLogprobs] | None = None
    # in the first output of a request that asked: the prompt's tokens 1.. each given those before it
    prompt_logprobs: list[SampledLogprobs] | None = None
    finish_reason: str | None = None
    # the last token, where it ended the request by being a stop token (EOS or one of `stop_token_ids`); a
    # "stop" without it was the grammar's end
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    error_code: int = 0
    # in a 400: the request's field at fault, by the engine's name for it (the constraint's: "response_format")
    error_param: str | None = None


class OutputBatch(Message):
    outputs: list[RequestOutput]


class EngineStats(Message):
    running: dict[str, int]
    waiting: dict[str, int]
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_cached_kv_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    step_time_s: float
    batch_size: int
    gpu_memory_allocated: int
    gpu_memory_reserved: int
    ready: bool
    # Totals since the engine started: a restarted frontend still reports them whole.
    num_prompt_tokens: int = 0  # of requests whose prefill completed
    num_generation_tokens: int = 0
    num_finished: dict[str, int] = {}  # by finish reason: stop, length, abort, error
    queue_time_counts: list[int] = []  # per QUEUE_TIME_BUCKETS_S bound, then one for longer
    queue_time_sum_s: float = 0.0
    num_spec_proposed_tokens: int = 0  # draft tokens verified
    num_spec_accepted_tokens: int = 0  # of those, accepted


# Upper bounds of the queue-time histogram: arrival in the engine until first scheduled.
QUEUE_TIME_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# ---- scheduler -> worker ---------------------------------------------------------------

class SequenceSampling(Message):
    """Installed on the worker's `slot` before the sequence's first sampled token.

    The token lists feed the penalties; they are sent only when penalties are on."""
    slot: int
    params: SamplingParams
    prompt_token_ids: list[int] = []
    output_token_ids: list[int] = []


class BlockTableUpdate(msgspec.Struct, array_like=True):
    """Entries [start, start + len(block_ids)) of the block table the worker keeps for `slot`."""
    slot: int
    start: int
    block_ids: list[int]


class PromptLogprobTargets(msgspec.Struct, array_like=True):
    """Row `row` of a step computes the logprobs of `token_ids`, the prompt tokens that follow its new
    tokens' positions (the prompt ends inside or right after the chunk: fewer targets than tokens)."""
    row: int
    num_top: int
    token_ids: list[int]


class ForwardBatch(Message):
    """One model step over a ragged batch of sequences, one entry per sequence.

    `input_token_ids` is flat (sum of `num_new_tokens`); an id of -1 stands for the
    token the worker sampled last for that slot, which lets the scheduler send step N+1
    before it has read step N's tokens. `context_lens` count the sequence's tokens
    including the new ones. Block tables live on the worker, one per slot: a step carries
    only the entries that changed since the slot's last step (a whole table when a request
    takes a slot), applied before the step runs."""
    step_id: int
    slots: list[int]
    num_new_tokens: list[int]
    context_lens: list[int]
    input_token_ids: list[int]
    sample: list[bool]
    block_table_updates: list[BlockTableUpdate] = []
    new_sequences: list[SequenceSampling] = []
    swap_out: list[tuple[int, int]] = []
    swap_in: list[tuple[int, int]] = []
    # Sampled rows (indices among those whose `sample` is true) that a grammar constrains, and their
    # token bitmask (int32 words, bit t % 32 of word t // 32 allows token t; one row after another). An
    # empty mask means a GrammarMask follows: a row's previous token was still in flight when this
    # step was sent, and the grammar needs it first. A view, not bytes: the scheduler's reused buffer when
    # sent (the worker copies it at once), the received message's bytes when decoded.
    grammar_rows: list[int] = []
    grammar_mask: memoryview = memoryview(b"")
    # Sampled rows (as `grammar_rows` count them) whose request is short of its min_tokens: the worker masks
    # the model's EOS and the request's stop_token_ids there.
    min_tokens_rows: list[int] = []
    prompt_logprobs: list[PromptLogprobTargets] = []
    # Speculative decoding: per sequence, how many of its new tokens are drafts (its last ones, after the
    # token it decodes); empty when no sequence has any. A sampled sequence with k drafts has 1 + k
    # sampled rows, one per position, in order; `grammar_rows` count such rows.
    num_draft_tokens: list[int] = []
    # A step sent behind a long one: the worker stages it at once but may launch it up to `hold_s` seconds after
    # taking it in (earlier if the steps before it end), so that an `urgent` step that comes meanwhile runs before
    # it. An urgent step holds high-priority prompts alone, none of whose slots, blocks or cached prefix the
    # held step writes (Scheduler.schedule_urgent): it is correct on either side of the held step.
    hold_s: float = 0.0
    urgent: bool = False
    # (only the forward waits: a held step's swaps and block-table entries are applied as it is staged, on
    # receipt, so blocks it swaps out are copied before any later step writes them)

    def sampled_rows(self) -> list[int]:
        """Rows of logits each sampled sequence has: one, plus one per draft."""
        if not self.num_draft_tokens:
            return [1] * sum(self.sample)
        return [1 + drafts for drafts, sample in zip(self.num_draft_tokens, self.sample) if sample]


class GrammarMask(Message):
    """The bitmask of step `step_id`'s grammar rows, sent after `step_id` and at most one step more, before
    any later step: a worker in its own process gets the step that follows first, stages it while it waits
    for the mask and launches it after `step_id`'s sampling."""
    step_id: int
    bitmask: memoryview  # as ForwardBatch.grammar_mask


class StartProfile(Message):
    directory: str


class StopProfile(Message):
    pass


# ---- worker -> scheduler ---------------------------------------------------------------

class WorkerReady(Message):
    protocol_version: int
    model_name: str
    max_context_length: int
    eos_token_ids: list[int]
    num_kv_blocks: int
    num_cpu_kv_blocks: int
    block_size: int
    vocab_size: int
    pid: int
    # whether it holds a step sent with `hold_s` (a GPU worker in its own process without other ranks): else
    # the engine sends no hold and no urgent step, which would only run behind the step it was to precede
    holds_steps: bool = False
    device_type: str = "cpu"  # its torch device's: "cuda" or "cpu" (defaults that depend on the step's speed)


class ForwardResult(Message):
    """Sampled tokens of the sequences of `step_id` whose `sample` was true, in order."""
    step_id: int
    token_ids: list[int]
    logprobs: list[SampledLogprobs | None]
    # when the step verified drafts: per sampled sequence, the tokens it emits (its accepted drafts, then the
    # target's own token at the first rejected position or after the last draft); token_ids holds the last
    accepted_token_ids: list[list[int]] = []
    accepted_logprobs: list[list[SampledLogprobs | None]] = []  # of those tokens, where asked for
    # per entry of the batch's `prompt_logprobs`, one per target token
    prompt_logprobs: list[list[SampledLogprobs]] = []
    forward_time_s: float = 0.0
    # the worker's host time from taking the step in to launching its forward (staging; on a CPU, the forward
    # itself): how long before the step in flight ends the engine sends the next one (engine/send_timing.py)
    launch_time_s: float = 0.0
    gpu_memory_allocated: int = 0
    gpu_memory_reserved: int = 0


class WorkerFailed(Message):
    error: str


FrontendToEngine = Union[ClientHello, GenerateRequest, AbortRequest, Heartbeat, ClientGoodbye, ProfileControl,
                         FlushPrefixCache, Shutdown]
EngineToFrontend = Union[EngineHello, OutputBatch, EngineStats]
SchedulerToWorker = Union[ForwardBatch, GrammarMask, StartProfile, StopProfile, Shutdown]
WorkerToScheduler = Union[WorkerReady, ForwardResult, WorkerFailed]


class MessageCodec:
    """msgpack encoder plus a decoder for one direction's union of messages."""

    def __init__(self, incoming: object) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(incoming)

    def encode(self, message: Message) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes) -> Message:
        return self._decoder.decode(data)
