"""The configuration of an sfllm server or offline engine, and the part of it each process reads.

Every option is defined once, in `ServerConfig`: a config-file key, a `--flag` and an `SFLLM_<KEY>`
environment variable; vLLM's and SGLang's names for the same settings are read as keys, keywords and flags
(sfllm/other_engine_settings.py). Precedence: flag > environment > config file > default. Each process gets
only its part: `FrontendConfig`, `EngineConfig` (with the engine core's `SchedulerConfig` and the
`WorkerConfig` it hands its worker), `WorkerConfig`. `sfllm launch` alone holds the whole.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sfllm.frontend.reasoning_parser import REASONING_PARSERS
from sfllm.frontend.tool_call_parser import TOOL_CALL_FORMATS
from sfllm.other_engine_settings import NO_EFFECT, NO_EFFECT_WITH_VALUE, OTHER_NAMES, OTHER_VALUES, SHORT_FLAGS
from sfllm.shipped_profiles import shipped_profile, shipped_profile_names

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
ENV_PREFIX = "SFLLM_"
# The step budget near high-priority traffic, by the worker's device: ~5 ms of Qwen3-0.6B prefill on an H200; on a
# CPU, 2,048 tokens of SmolLM2-135M take seconds and 256 tokens cost no throughput (docs/performance.md, ninth session).
HIGH_PRIORITY_STEP_TOKENS = {"cuda": 2048, "cpu": 256}


class ConfigError(ValueError):
    pass


@dataclass
class ServerConfig:
    """Every option, flat, as users give it (flags, environment, profiles, `LLM(...)` keywords); `sfllm launch`
    holds it whole, and hands each process its part."""
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "HF folder, .gguf file, or a dummy preset name"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name in the API (default: model)"})
    load_format: str = field(default="auto", metadata={"help": "auto | safetensors | gguf | dummy"})
    dtype: str = field(default="auto", metadata={"help": "auto | float32 | float16 | bfloat16 (vLLM's half, float)"})
    device: str = field(default="auto", metadata={"help": "auto | cuda | cpu"})
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "GPUs one model is split over (tensor parallelism: one worker process per GPU, NCCL; gloo on CPU)"})
    cache_dir: str = field(default="~/.cache/sfllm", metadata={"help": "converted-model cache"})
    seed: int = field(default=0, metadata={"help": "seed of dummy weights and unseeded sampling"})

    host: str = field(default="0.0.0.0", metadata={"help": "HTTP bind address"})
    port: int = field(default=8081, metadata={"help": "HTTP port"})
    api_key: str | None = field(default=None, metadata={"help": "require this Bearer token"})
    # browsers may call the API from any page, as vLLM's and SGLang's defaults let them (no cookies are sent)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"], metadata={
        "help": "origins a browser may call the API from (CORS): a JSON list or comma-separated (default: any)"})
    allowed_methods: list[str] = field(default_factory=lambda: ["*"], metadata={
        "help": "HTTP methods such calls may use (CORS; default: any)"})
    allowed_headers: list[str] = field(default_factory=lambda: ["*"], metadata={
        "help": "request headers such calls may send (CORS; default: any)"})
    allow_credentials: bool = field(default=False, metadata={
        "help": "let such calls send cookies and HTTP authentication (CORS; with any origin, every page may)"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})
    access_log: bool = field(default=False, metadata={"help": "uvicorn access log"})
    disable_log_stats: bool = field(default=False, metadata={
        "help": "no engine loop and worker loop lines (where their time went) every 10 s while steps run"})
    run_dir: str | None = field(default=None, metadata={"help": "folder of the IPC sockets"})
    engine_address: str | None = field(default=None, metadata={"help": "engine socket (ipc:// or tcp://)"})
    frontend_processes: int | None = field(default=None, metadata={
        "help": "HTTP frontend processes sharing the port (launch only; default: one per 4 cores, 1 to 4)"})
    drain_timeout_s: float = field(default=30.0, metadata={"help": "on SIGTERM, how long running requests may finish"})
    request_timeout_s: float | None = field(default=None, metadata={"help": "abort requests running longer"})
    max_request_body_bytes: int = field(default=4 << 20, metadata={"help": "largest request body (413 above)"})
    max_prompt_tokens: int | None = field(default=None, metadata={"help": "longest prompt (default: the context)"})
    max_output_tokens: int | None = field(default=None, metadata={"help": "largest max_tokens (default: the context)"})
    max_n: int = field(default=128, metadata={"help": "most sequences per request (n times the prompts)"})
    max_stop_sequences: int = field(default=16, metadata={"help": "most stop strings, and stop token ids, per request"})
    max_stop_sequence_chars: int = field(default=256, metadata={"help": "longest stop string"})
    chat_template: str | None = field(default=None, metadata={
        "help": "a Jinja chat template in place of the model's: a file's path, or the template itself (vLLM's)"})
    tool_call_parser: str | None = field(default=None, metadata={
        "help": "hermes | llama3_json (SGLang's qwen, qwen25 | llama3): how the model writes tool calls, where its "
                "chat template renders tools (default: as the template asks; vLLM's flag)"})
    reasoning_parser: str | None = field(default=None, metadata={
        "help": "qwen3 | deepseek_r1: a thinking model's <think> text as the chat message's reasoning_content"})
    generation_config: str = field(default="auto", metadata={
        "help": "auto: the sampling values a request leaves out (temperature, top_p, top_k, min_p, "
                "repetition_penalty, max_tokens) from the model's generation_config.json, as vLLM; vllm: sfllm's "
                "own (OpenAI's); or a folder holding a generation_config.json"})
    override_generation_config: dict | None = field(default=None, metadata={
        "help": "JSON object of values over those, by generation_config.json's keys (vLLM's flag), e.g. "
                "'{\"temperature\": 0.5}'"})

    max_context_length: int | None = field(default=None, metadata={"help": "longest prompt + output"})
    max_running_tokens: int = field(default=8192, metadata={"help": "token budget of one step"})
    max_running_requests: int = field(default=256, metadata={"help": "requests in one batch"})
    # A few slots past the batch limit spare a high-priority arrival under a full batch from pushing out a running
    # request, and let it run at once, in a step of its own that the worker puts before the step it holds
    # (sfllm/engine/engine_core.py): there is no slot to take from a request that step is about to decode.
    high_priority_slots: int = field(default=4, metadata={
        "help": "sequence slots past max_running_requests that only high-priority requests take"})
    # A high-priority arrival waits for the step in flight (an 8,192-token prefill step of a flood takes ~15-20 ms
    # on an H200 with Qwen3-0.6B): while that traffic is about, steps that carry none of its prompts are kept short
    # (HIGH_PRIORITY_STEP_TOKENS by the worker's device).
    high_priority_step_tokens: int | None = field(default=None, metadata={
        "help": "token budget of a step without high-priority prompts within a minute of a high-priority arrival "
                "(default: 2048 on a GPU, 256 on a CPU; 0: max_running_tokens)"})
    max_waiting_requests: int = field(default=4096, metadata={"help": "queue length per class before 503"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_kv_blocks: int | None = field(default=None, metadata={"help": "KV pool size (default: from memory)"})
    mem_fraction: float = field(default=0.85, metadata={"help": "fraction of GPU memory sfllm may use"})
    cpu_kv_cache_gib: float = field(default=1.0, metadata={"help": "KV pool on CPU devices / swap space"})
    cpu_threads: int | None = field(default=None, metadata={"help": "worker threads on a CPU device (default: all "
                                                                     "cores)"})
    attention_backend: str = field(default="auto", metadata={"help": "auto | torch | triton"})
    cuda_graph_max_bs: int | None = field(default=None, metadata={
        "help": "largest captured decode batch (default: from GPU memory, up to the sequence slots)"})
    disable_cuda_graph: bool = field(default=False, metadata={"help": "run decode eagerly"})
    disable_overlap: bool = field(default=False, metadata={"help": "wait for each step before the next"})
    disable_prefix_cache: bool = field(default=False, metadata={"help": "no KV sharing between requests"})
    speculative_method: str | None = field(default=None, metadata={
        "help": "ngram: draft tokens by prompt lookup and verify them in one step (default: off)"})
    num_speculative_tokens: int = field(default=4, metadata={"help": "draft tokens per speculating request and step"})
    speculative_ngram_min: int = field(default=2, metadata={"help": "shortest suffix the n-gram proposer matches"})
    speculative_ngram_max: int = field(default=4, metadata={"help": "longest suffix the n-gram proposer matches"})
    speculative_max_batch_size: int = field(default=32, metadata={
        "help": "no drafts in a step of more running requests (large batches are compute-bound)"})
    # measured break-even at batch 1: a verify step without the overlap costs 2.1-2.2 decode steps on an H200 and
    # 2.3 on the CI CPU, so fewer than ~0.3 x 4 accepted drafts a step lose time (docs/performance.md)
    speculative_min_acceptance_rate: float = field(default=0.3, metadata={
        "help": "a request whose drafts are accepted less often stops speculating"})
    schedule_policy: str = field(default="fcfs", metadata={"help": "fcfs | length-bucket"})
    preemption_mode: str = field(default="recompute", metadata={"help": "recompute | swap"})
    background_share: float = field(default=0.5, metadata={"help": "batch share of background vs normal"})
    max_background_wait_s: float = field(default=30.0, metadata={"help": "aging bound of background requests"})
    profile_dir: str | None = field(default=None, metadata={"help": "where profiler traces go"})

    def __post_init__(self) -> None:
        if self.frontend_processes is None:
            # one Python process streams ~20k tokens/s; the GPU hosts' 16 cores serve four with room to spare
            self.frontend_processes = min(4, max(1, len(os.sched_getaffinity(0)) // 4))
        for key, words in OTHER_VALUES.items():
            setattr(self, key, words.get(getattr(self, key), getattr(self, key)))
        choices = {
            "load_format": ("auto", "safetensors", "gguf", "dummy"),
            "dtype": ("auto", "float32", "float16", "bfloat16"),
            "device": ("auto", "cuda", "cpu"),
            "attention_backend": ("auto", "torch", "triton"),
            "schedule_policy": ("fcfs", "length-bucket"),
            "preemption_mode": ("recompute", "swap"),
            "log_level": ("debug", "info", "warning", "error"),
            "speculative_method": (None, "ngram"),
            "reasoning_parser": (None, *REASONING_PARSERS),
            "tool_call_parser": (None, *TOOL_CALL_FORMATS),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(str(a) for a in allowed)}; "
                                  f"got {getattr(self, key)!r}")
        positive = ("max_running_tokens", "max_running_requests", "block_size", "max_waiting_requests",
                    "max_request_body_bytes", "max_prompt_tokens", "max_output_tokens", "max_n",
                    "max_stop_sequences", "max_stop_sequence_chars", "request_timeout_s", "cpu_threads",
                    "frontend_processes", "cuda_graph_max_bs", "tensor_parallel_size", "num_speculative_tokens",
                    "speculative_ngram_min", "speculative_max_batch_size", "max_context_length", "num_kv_blocks")
        for key in positive:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key} must be positive; got {value}")
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two (the kernels' tiles); got {self.block_size}")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be in [1, 65535]; got {self.port}")
        for key in ("high_priority_slots", "high_priority_step_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ConfigError(f"{key} must be at least 0; got {getattr(self, key)}")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"drain_timeout_s must be at least 0; got {self.drain_timeout_s}")
        if self.speculative_ngram_max < self.speculative_ngram_min:
            raise ConfigError(f"speculative_ngram_max ({self.speculative_ngram_max}) must be at least "
                              f"speculative_ngram_min ({self.speculative_ngram_min})")
        if not 0.0 <= self.speculative_min_acceptance_rate <= 1.0:
            raise ConfigError(f"speculative_min_acceptance_rate must be in [0, 1]; got "
                              f"{self.speculative_min_acceptance_rate}")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ConfigError(f"mem_fraction must be in (0, 1]; got {self.mem_fraction}")
        if not 0.0 <= self.background_share <= 1.0:
            raise ConfigError(f"background_share must be in [0, 1]; got {self.background_share}")
        for key in ("max_background_wait_s", "cpu_kv_cache_gib"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{key} must be at least 0; got {getattr(self, key)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number; got {value}")
        if self.chat_template is not None:
            # before anything starts (jinja2 imported only here: the launcher's start is lean)
            from sfllm.model_source.chat_template_override import chat_template_source
            try:
                chat_template_source(self.chat_template)
            except ValueError as error:
                raise ConfigError(f"chat_template: {error}") from None
        from sfllm.model_source.generation_defaults import (GenerationConfigError, check_generation_config_setting,
                                                           check_overrides)
        try:
            check_generation_config_setting(self.generation_config)
        except GenerationConfigError as error:
            raise ConfigError(f"generation_config {error}") from None
        if self.override_generation_config is not None:
            if not isinstance(self.override_generation_config, dict):
                raise ConfigError(f"override_generation_config must be a JSON object; got "
                                  f"{self.override_generation_config!r}")
            try:
                check_overrides(self.override_generation_config)
            except GenerationConfigError as error:
                raise ConfigError(f"override_generation_config: {error}") from None
        if self.engine_address is not None and not self.engine_address.startswith(("ipc://", "tcp://")):
            raise ConfigError(f"engine_address must be ipc://<path> or tcp://<host>:<port>; got {self.engine_address!r}")

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        return Path(tempfile.gettempdir()) / f"sfllm-{self.port}"

    def resolved_engine_address(self) -> str:
        return self.engine_address or f"ipc://{self.resolved_run_dir() / 'engine.sock'}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _part(self, cls: type[_Part], **resolved: Any) -> _Part:
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.name not in resolved},
                   **resolved)

    def frontend(self) -> FrontendConfig:
        # A request's sequences queue at once, in one class: more than the queue holds could never be served.
        return self._part(FrontendConfig, engine_address=self.resolved_engine_address(),
                          max_n=min(self.max_n, self.max_waiting_requests))

    def scheduler(self) -> SchedulerConfig:
        return self._part(SchedulerConfig)

    def worker(self) -> WorkerConfig:
        return self._part(WorkerConfig)

    def engine(self) -> EngineConfig:
        return self._part(EngineConfig, run_dir=self.resolved_run_dir(), engine_address=self.resolved_engine_address(),
                          scheduler=self.scheduler(), worker=self.worker())


# The parts below name their fields as ServerConfig does; the values (and the defaults, the help and the checks
# behind them) come from there.

@dataclass(frozen=True)
class FrontendConfig:
    """A frontend process's: HTTP, authentication, the bounds on one request, and where the engine is."""
    engine_address: str  # resolved: engine_address, or the socket in the run directory
    host: str
    port: int
    api_key: str | None
    allowed_origins: list[str]
    allowed_methods: list[str]
    allowed_headers: list[str]
    allow_credentials: bool
    log_level: str
    access_log: bool
    drain_timeout_s: float
    request_timeout_s: float | None
    max_request_body_bytes: int
    max_prompt_tokens: int | None
    max_output_tokens: int | None
    max_n: int
    max_stop_sequences: int
    max_stop_sequence_chars: int
    reasoning_parser: str | None
    tool_call_parser: str | None


@dataclass(frozen=True)
class SchedulerConfig:
    """The engine core's and its scheduler's: a step's budget and the scheduling policies."""
    max_running_tokens: int
    max_running_requests: int
    high_priority_slots: int
    high_priority_step_tokens: int | None  # None: HIGH_PRIORITY_STEP_TOKENS[the worker's device type]
    max_waiting_requests: int
    block_size: int
    disable_prefix_cache: bool
    disable_overlap: bool
    schedule_policy: str
    preemption_mode: str
    background_share: float
    max_background_wait_s: float
    speculative_method: str | None
    num_speculative_tokens: int
    speculative_ngram_min: int
    speculative_ngram_max: int
    speculative_max_batch_size: int
    speculative_min_acceptance_rate: float


@dataclass(frozen=True)
class WorkerConfig:
    """A worker process's (every tensor-parallel rank's): the model, the device, the memory plan, the graphs.

    Its values are options as given (nothing resolved), so that it travels as a config file (`write_config_file`)."""
    model: str
    load_format: str
    cache_dir: str
    dtype: str
    device: str
    tensor_parallel_size: int
    seed: int
    log_level: str
    disable_log_stats: bool
    max_context_length: int | None
    max_running_tokens: int
    max_running_requests: int
    high_priority_slots: int
    block_size: int
    num_kv_blocks: int | None
    mem_fraction: float
    cpu_kv_cache_gib: float
    cpu_threads: int | None
    attention_backend: str
    cuda_graph_max_bs: int | None
    disable_cuda_graph: bool
    preemption_mode: str  # swap plans a CPU pool
    speculative_method: str | None  # verify steps: graphs and logits rows for every draft position
    num_speculative_tokens: int
    speculative_max_batch_size: int


@dataclass(frozen=True)
class EngineConfig:
    """The engine process's: where frontends find it, the model it names and tokenizes for them, its engine core's
    configuration, and the worker's, which it hands to the worker it starts."""
    run_dir: Path  # resolved: run_dir, or the folder named after the port
    engine_address: str  # resolved: engine_address, or the socket in the run directory
    model: str
    load_format: str
    cache_dir: str
    served_model_name: str | None
    chat_template: str | None  # in place of the model's, in the tokenizer frontends get
    disable_log_stats: bool
    generation_config: str  # where the sampling values a request leaves out come from
    override_generation_config: dict | None
    log_level: str
    profile_dir: str | None
    scheduler: SchedulerConfig
    worker: WorkerConfig

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def with_device_defaults(config: SchedulerConfig, device_type: str) -> SchedulerConfig:
    """`config` with the values left to the worker's device (its `WorkerReady.device_type`) filled in."""
    if config.high_priority_step_tokens is not None:
        return config
    step_tokens = HIGH_PRIORITY_STEP_TOKENS.get(device_type, HIGH_PRIORITY_STEP_TOKENS["cuda"])
    return dataclasses.replace(config, high_priority_step_tokens=step_tokens)


def num_sequence_slots(config: SchedulerConfig | WorkerConfig) -> int:
    """The slots the scheduler hands out and the worker keeps state for: the batch limit and high priority's."""
    return config.max_running_requests + config.high_priority_slots


_Part = TypeVar("_Part", FrontendConfig, SchedulerConfig, WorkerConfig, EngineConfig)
FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
# Only frontends need the API key: `sfllm launch` hands it to them in their environment, never in a file.
API_KEY_ENV = f"{ENV_PREFIX}API_KEY"


def without_config_environment() -> dict[str, str]:
    """The environment for a child process that reads its configuration from a file: stale SFLLM_* values
    must not override it."""
    return {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}


def write_config_file(values: dict[str, Any], path: Path) -> None:
    """A config file a child process reads (`--config`), owner-only."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as config_file:
        config_file.write(yaml.safe_dump(values))


def _parse_value(key: str, raw: Any, source: str = "") -> Any:
    """Convert a string (flag or environment) or YAML value to the field's type; `source` says where the value
    came from, in the error."""
    try:
        return _typed(key, raw)
    except ConfigError as error:
        raise ConfigError(f"{error} ({source})" if source else str(error)) from None


def _typed(key: str, raw: Any) -> Any:
    annotation = str(FIELDS[key].type)
    if raw is None:
        return None
    if "bool" in annotation:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false; got {raw!r}")
    for kind in (int, float):
        if annotation.startswith(kind.__name__):
            if isinstance(raw, bool) or (kind is int and isinstance(raw, float) and not raw.is_integer()):
                raise ConfigError(f"{key} must be {kind.__name__}; got {raw!r}")
            try:
                return kind(raw)
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{key} must be {kind.__name__}; got {raw!r}") from None
    if annotation.startswith("str"):
        return str(raw)
    if annotation.startswith("list") and isinstance(raw, str):  # a flag's or the environment's: JSON, or a, b
        text = raw.strip()
        if text.startswith("["):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{key} must be a JSON list or comma-separated; got {raw!r} ({error})") from None
        else:
            raw = [item.strip() for item in text.split(",") if item.strip()]
    if annotation.startswith("list") and not (isinstance(raw, list) and all(isinstance(item, str) for item in raw)):
        raise ConfigError(f"{key} must be a list of strings; got {raw!r}")
    if annotation.startswith("dict") and isinstance(raw, str):  # a flag's or the environment's JSON
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{key} must be a JSON object; got {raw!r} ({error})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{key} must be a JSON object; got {raw!r}")
    return raw


def _config_file(given: str) -> Path:
    """The file `--config` names: the path as given, else the shipped profile of that file name."""
    path = Path(given)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"config file {given} is a folder: name a YAML file in it")
    shipped = shipped_profile(given)
    if shipped is not None:
        logger.info("config file %s: the profile sfllm ships, %s", given, shipped)
        return shipped
    names = ", ".join(shipped_profile_names()) or "none found"
    raise ConfigError(f"config file {given} does not exist, nor is it a profile sfllm ships ({names})")


def _read_config_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}: "
                          f"{getattr(error, 'problem', None) or error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values")
    return data


class _SettingFlag(argparse.Action):
    """Stores a setting's value, and in `other_flags` the flag it came by where that is another engine's name for
    it, which errors then name."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        other_flags = dict(getattr(namespace, "other_flags", None) or {})
        if option_string != self.option_strings[0]:
            other_flags[self.dest] = option_string
        else:
            other_flags.pop(self.dest, None)
        namespace.other_flags = other_flags


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config key; unset flags stay None so lower layers show through."""
    parser.add_argument("--config", help="YAML file of config keys")
    for name, f in FIELDS.items():
        # vLLM's and SGLang's flags for the same setting, beside sfllm's
        flags = [_flag(key) for key in [name, *(k for k, o in OTHER_NAMES.items()
                                               if o.setting == name and not o.negated)]]
        flags += [SHORT_FLAGS[name]] if name in SHORT_FLAGS else []
        if "bool" in str(f.type):
            parser.add_argument(*flags, dest=name, action="store_const", const=True, default=None,
                                help=f.metadata.get("help"))
        else:
            parser.add_argument(*flags, dest=name, default=None, action=_SettingFlag, help=f.metadata.get("help"))
    for key, other in OTHER_NAMES.items():
        if other.negated:  # vLLM's --enable-prefix-caching and --no-enable-prefix-caching
            parser.add_argument(_flag(key), dest=other.setting, action="store_const", const=False, default=None,
                                help=f"{other.engine}'s: {_flag(other.setting)} off")
            parser.add_argument(_flag(f"no_{key}"), dest=other.setting, action="store_const", const=True,
                                default=None, help=f"{other.engine}'s: {_flag(other.setting)}")
    for key, why in NO_EFFECT.items():
        help_text = f"accepted for vLLM's and SGLang's command lines, no effect: {why}"
        if key in NO_EFFECT_WITH_VALUE:  # older vLLM took a value (--enable-chunked-prefill True)
            parser.add_argument(_flag(key), nargs="?", const="true", type=str.lower, choices=("true", "false"),
                                help=help_text)
        else:
            parser.add_argument(_flag(key), action="store_true", help=help_text)


def load_config(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None,
                **overrides: Any) -> ServerConfig:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = getattr(args, "config", None) if args is not None else None
    given_as: dict[str, str] = {}
    if config_file:
        path = _config_file(config_file)
        values.update(_settings(_read_config_file(path), f"in {path}", given_as))
    for env_key, raw in environ.items():
        if not env_key.startswith(ENV_PREFIX):
            continue
        name = env_key[len(ENV_PREFIX):].lower()
        if name in FIELDS:
            values[name] = _parse_value(name, raw, f"from the environment's {env_key}")
            given_as.pop(name, None)
        else:
            logger.warning("%s is not an sfllm setting (no config key %r): ignored", env_key, name)
    if args is not None:
        other_flags = getattr(args, "other_flags", None) or {}
        for name in FIELDS:
            raw = getattr(args, name, None)
            if raw is not None:
                flag = other_flags.get(name)
                values[name] = _parse_value(name, raw, f"given as {flag}" if flag else "")
                other = OTHER_NAMES.get(flag.lstrip("-").replace("-", "_")) if flag else None
                if other is not None:  # its values in sfllm's words (SGLang's --sampling-defaults model)
                    values[name] = other.value(values[name])
                if flag:
                    given_as[name] = flag
                else:
                    given_as.pop(name, None)
    values.update(_settings(overrides, given_as=given_as))  # LLM(key=...): a wrong type is a ConfigError naming it
    try:
        return ServerConfig(**values)
    except ConfigError as error:  # a range check names sfllm's setting: also the name the user gave it by
        setting = str(error).split(" ", 1)[0]
        if setting in given_as:
            raise ConfigError(f"{error} (given as {given_as[setting]})") from None
        raise


def _settings(given: dict, source: str = "", given_as: dict[str, str] | None = None) -> dict[str, Any]:
    """sfllm's settings from keys of a file or `LLM(...)`: sfllm's names, vLLM's and SGLang's (OTHER_NAMES), those
    without effect here dropped, None for the default (as vLLM reads it); an unknown key, or two names of one
    setting, is a ConfigError. `given_as` gets the other engines' names of the settings they set."""
    settings: dict[str, Any] = {}
    named_by: dict[str, str] = {}
    where = f" {source}" if source else ""
    for key, raw in given.items():
        name = str(key).replace("-", "_")
        if name in NO_EFFECT:
            continue
        other = OTHER_NAMES.get(name)
        setting = other.setting if other is not None else name
        if setting not in FIELDS:
            raise ConfigError(f"unknown config key {key!r}{where}")
        if setting in named_by:
            raise ConfigError(f"{named_by[setting]} and {key} both set {setting}{where}; give one")
        named_by[setting] = str(key)
        if raw is None:
            continue
        if given_as is not None:
            if other is not None:
                given_as[setting] = str(key)
            else:
                given_as.pop(setting, None)
        value = _parse_value(setting, raw, ", ".join(filter(None, [source, f"given as {key}" if other else ""])))
        settings[setting] = other.value(value) if other is not None else value
    return settings
