"""GET /metrics: the server in Prometheus text format, every name prefixed `sfllm_`, and vLLM's and SGLang's names
for those their dashboards and gateways read (other_engine_metrics.py).

Two owners. The frontend times the HTTP requests it serves: counts by status and
priority, time to first token, time per output token, end-to-end latency; those start
again with a restarted frontend. What the engine counts (tokens, finished requests by
reason, preemptions, prefix-cache hits, queue time) and its state (running and waiting
requests, KV cache, batch, step time, GPU memory) are read from its latest EngineStats
at scrape time, so a new frontend reports the engine's totals.

With several frontend processes (`--frontend-processes`), `sfllm launch` gives them one
folder in PROMETHEUS_MULTIPROC_DIR: each scrape then sums the HTTP metrics of all of them,
restarted ones included; the in-flight and draining gauges stay those of the process asked.

Queue time is the engine's: from a request's arrival in the engine's waiting queue until
the scheduler first puts it in a step. Time to first token runs from the frontend's
arrival to the first output token, so it holds tokenization, queue time and prefill.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sfllm.frontend.engine_client import EngineClient
from sfllm.frontend.other_engine_metrics import other_engine_families
from sfllm.frontend.refusal_log import RefusalLog
from sfllm.frontend.request_gate import DrainState
from sfllm.messages import QUEUE_TIME_BUCKETS_S

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/generate"})
# Status of a response that started but did not finish: the client left, or a shutdown cut it (nginx's 499).
CUT_SHORT = 499
FINISH_REASONS = ("stop", "length", "abort", "error")
REFUSALS = (503, 504)  # answers the refusal log reports: turned away (queue full, draining) or timed out

REQUEST_LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                           2.5, 5.0, 10.0)
_OUTCOME_KEY = "sfllm_outcome"
# read by prometheus_client when it is imported: set by the launcher in each frontend's environment
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


@dataclass
class RequestOutcome:
    """What the metrics middleware cannot read off the wire: the priority, and an error inside a stream."""
    priority: str = "none"
    stream_error_status: int | None = None
    stream_error_code: str | None = None


def request_outcome(request: Request) -> RequestOutcome:
    """This request's outcome record, shared with the middleware through the ASGI scope's state."""
    state = request.scope.setdefault("state", {})
    return state.setdefault(_OUTCOME_KEY, RequestOutcome())


def token_count_buckets(max_context_length: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context, as vLLM's token-count histograms bucket."""
    buckets, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > max_context_length:
                return tuple(buckets)
            buckets.append(step * scale)
        scale *= 10


class FrontendMetrics:
    def __init__(self, engine: EngineClient, drain: DrainState, model_name: str, max_context_length: int) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sfllm_requests", "Generation requests answered, by HTTP status and priority class; a stream that "
            "failed after it started counts its error's status, one cut short 499", ["status", "priority"],
            registry=self.registry)
        self.time_to_first_token = Histogram(
            "sfllm_time_to_first_token_seconds", "From the request's arrival in the frontend to each sequence's "
            "first output token", buckets=REQUEST_LATENCY_BUCKETS_S, registry=self.registry)
        self.time_per_output_token = Histogram(
            "sfllm_time_per_output_token_seconds", "Mean time between a sequence's output tokens after the first",
            buckets=TOKEN_LATENCY_BUCKETS_S, registry=self.registry)
        self.e2e_latency = Histogram(
            "sfllm_e2e_request_latency_seconds", "From arrival to the last byte of a successful (200) request",
            buckets=REQUEST_LATENCY_BUCKETS_S, registry=self.registry)
        token_buckets = token_count_buckets(max_context_length)
        self.prompt_tokens = Histogram(
            "sfllm_request_prompt_tokens", "Prompt tokens of each sequence that produced output",
            buckets=token_buckets, registry=self.registry)
        self.generation_tokens = Histogram(
            "sfllm_request_generation_tokens", "Output tokens of each sequence, as it finished",
            buckets=token_buckets, registry=self.registry)
        self.exposed = self.registry
        if multiprocess_dir := os.environ.get(MULTIPROCESS_DIR_ENV):
            self.exposed = CollectorRegistry()
            MultiProcessCollector(self.exposed, path=multiprocess_dir)
        self.exposed.register(EngineStatsCollector(engine, drain))
        self.model_name = model_name

    def render(self) -> bytes:
        return generate_latest(self)  # type: ignore[arg-type]

    def collect(self) -> Iterator[Metric]:
        """sfllm's metrics, then those other engines name under their names (other_engine_metrics.py)."""
        families = list(self.exposed.collect())
        yield from families
        yield from other_engine_families(families, self.model_name)

    def first_token(self, arrival_time: float) -> float:
        now = time.time()
        self.time_to_first_token.observe(max(now - arrival_time, 0.0))
        return now

    def sequence_finished(self, first_token_time: float, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self.prompt_tokens.observe(num_prompt_tokens)
        self.generation_tokens.observe(num_output_tokens)
        if num_output_tokens > 1:
            self.time_per_output_token.observe((time.time() - first_token_time) / (num_output_tokens - 1))


class MetricsMiddleware:
    """Counts and times every POST to the generation endpoints, rejected ones included."""

    def __init__(self, app: ASGIApp, metrics: FrontendMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.refusals = RefusalLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        outcome = scope.setdefault("state", {}).setdefault(_OUTCOME_KEY, RequestOutcome())
        status: int | None = None
        completed = False
        error_body = b""

        async def observed_send(message: Message) -> None:
            nonlocal status, completed, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if status in REFUSALS:
                    error_body += message.get("body", b"")
                completed = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            if status is None:
                status, completed = 500, True  # a bug in a middleware inside: Starlette's outermost one answers 500
            raise
        finally:
            code = _error_code(error_body)
            if outcome.stream_error_status is not None:
                status, code = outcome.stream_error_status, outcome.stream_error_code
            elif not completed:
                status = CUT_SHORT
            self.metrics.requests.labels(str(status), outcome.priority).inc()
            if status in REFUSALS:
                self.refusals.note(status, code, scope["path"])
            if status == 200:
                self.metrics.e2e_latency.observe(time.perf_counter() - started)


def _error_code(body: bytes) -> str | None:
    """The `code` of an OpenAI-shaped error body."""
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


class EngineStatsCollector(Collector):
    """The engine's latest EngineStats as metrics, read at scrape time."""

    def __init__(self, engine: EngineClient, drain: DrainState) -> None:
        self.engine = engine
        self.drain = drain

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("sfllm_engine_healthy", "1 while the engine answers heartbeats",
                                value=float(self.engine.healthy))
        yield GaugeMetricFamily("sfllm_frontend_requests_in_flight", "HTTP requests this frontend is serving",
                                value=self.drain.in_flight)
        yield GaugeMetricFamily("sfllm_frontend_draining", "1 once the frontend stopped taking new requests",
                                value=float(self.drain.draining))
        stats = self.engine.stats
        if stats is None:
            return
        for name, counts, what in (("sfllm_num_requests_running", stats.running, "in the running batch"),
                                   ("sfllm_num_requests_waiting", stats.waiting, "waiting to be scheduled")):
            family = GaugeMetricFamily(name, f"Requests {what}, by priority class", labels=["priority"])
            for priority, count in counts.items():
                family.add_metric([priority], count)
            yield family
        used = stats.num_kv_blocks - stats.num_free_kv_blocks
        yield GaugeMetricFamily("sfllm_kv_cache_usage_ratio", "Fraction of KV cache blocks held by requests",
                                value=used / stats.num_kv_blocks if stats.num_kv_blocks else 0.0)
        yield GaugeMetricFamily("sfllm_kv_cache_blocks", "KV cache blocks in the pool", value=stats.num_kv_blocks)
        yield CounterMetricFamily("sfllm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache, "
                                  "in whole KV blocks", value=stats.prefix_cache_queries)
        yield CounterMetricFamily("sfllm_prefix_cache_hits", "Prompt tokens found in the prefix cache, in whole "
                                  "KV blocks", value=stats.prefix_cache_hits)
        yield GaugeMetricFamily("sfllm_prefix_cache_hit_rate", "Prefix cache hits per query since the engine started",
                                value=stats.prefix_cache_hits / stats.prefix_cache_queries
                                if stats.prefix_cache_queries else 0.0)
        yield CounterMetricFamily("sfllm_preemptions", "Requests preempted to make room", value=stats.num_preemptions)
        yield CounterMetricFamily("sfllm_engine_steps", "Model steps run", value=stats.num_steps)
        yield GaugeMetricFamily("sfllm_batch_size", "Sequences in the latest step (0 while idle)",
                                value=stats.batch_size)
        yield GaugeMetricFamily("sfllm_step_time_seconds", "Duration of the latest step", value=stats.step_time_s)
        yield GaugeMetricFamily("sfllm_gpu_memory_allocated_bytes", "GPU memory held by tensors in the worker",
                                value=stats.gpu_memory_allocated)
        yield GaugeMetricFamily("sfllm_gpu_memory_reserved_bytes", "GPU memory reserved by the worker's allocator",
                                value=stats.gpu_memory_reserved)
        yield CounterMetricFamily("sfllm_prompt_tokens", "Prompt tokens of requests whose prefill completed",
                                  value=stats.num_prompt_tokens)
        yield CounterMetricFamily("sfllm_generation_tokens", "Output tokens generated",
                                  value=stats.num_generation_tokens)
        yield CounterMetricFamily("sfllm_spec_proposed_tokens", "Draft tokens verified (speculative decoding)",
                                  value=stats.num_spec_proposed_tokens)
        yield CounterMetricFamily("sfllm_spec_accepted_tokens", "Draft tokens accepted (speculative decoding)",
                                  value=stats.num_spec_accepted_tokens)
        finished = CounterMetricFamily("sfllm_requests_finished", "Engine requests (one per sequence) finished, "
                                       "by reason: stop, length, abort, error", labels=["reason"])
        for reason in dict.fromkeys([*FINISH_REASONS, *stats.num_finished]):  # each from 0, so no rise is lost
            finished.add_metric([reason], stats.num_finished.get(reason, 0))
        yield finished
        if len(stats.queue_time_counts) == len(QUEUE_TIME_BUCKETS_S) + 1:
            yield _queue_time_histogram(stats.queue_time_counts, stats.queue_time_sum_s)


def _queue_time_histogram(counts: list[int], sum_s: float) -> HistogramMetricFamily:
    buckets, total = [], 0
    for bound, count in zip([*map(floatToGoString, QUEUE_TIME_BUCKETS_S), "+Inf"], counts):
        total += count
        buckets.append((bound, total))
    return HistogramMetricFamily("sfllm_request_queue_time_seconds", "From a request's arrival in the engine's "
                                 "waiting queue until it was first scheduled", buckets=buckets, sum_value=sum_s)
