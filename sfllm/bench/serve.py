"""`sfllm bench serve`: load an OpenAI-compatible server with streaming requests and measure it.

Each level (a fixed concurrency, or a Poisson request rate) sends `--requests` requests and
records, per request, the time to the first text chunk, the gaps between text chunks and the
end-to-end time; token counts come from the server's `usage` chunk, never from the client.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import numpy as np
from tqdm import tqdm

from sfllm.bench.gpu_monitor import GpuMonitor, GpuMonitorError
from sfllm.bench.serve_report import (
    LevelResult,
    RequestRecord,
    config_json,
    format_table,
    level_label,
    plot,
    write_json,
)
from sfllm.bench.workload import (
    BENCH_SCHEMA,
    BENCH_STRUCTURAL_TAG,
    LengthRange,
    PromptFileWorkload,
    RandomTokenWorkload,
    RequestSpec,
    Workload,
    WorkloadError,
    parse_length_range,
    poisson_arrival_times,
)
from sfllm.messages import PRIORITIES

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]", "0.0.0.0")

DEFAULT_INPUT_LEN = "1024"
DEFAULT_OUTPUT_LEN = "128"
MAX_ERROR_CHARS = 200
DESCRIPTION = "Measure latency and throughput of an OpenAI-compatible server under streaming load."


class OptionError(ValueError):
    """Options that contradict each other."""


class BenchmarkSetupError(RuntimeError):
    """The benchmark cannot start (e.g. the server cannot tell its model name)."""


class StreamError(RuntimeError):
    """A 200 response whose stream was not a complete OpenAI completion stream."""


class SSEDecoder:
    """Splits a byte stream into the payloads of its `data:` lines.

    OpenAI-style servers put each JSON chunk on a single `data:` line, so a line is an event;
    this keeps the per-chunk work to one split and one prefix check."""

    def __init__(self) -> None:
        self._partial_line = b""

    def feed(self, data: bytes) -> list[bytes]:
        lines = (self._partial_line + data).split(b"\n")
        self._partial_line = lines.pop()
        return [line[5:].strip() for line in lines if line.startswith(b"data:")]


def chunk_has_text(chunk: dict[str, Any], endpoint: str) -> bool:
    """Whether a streamed chunk carries generated text (not a role, usage or empty chunk)."""
    choices = chunk.get("choices")
    if not choices:
        return False
    if endpoint == "chat":
        return bool((choices[0].get("delta") or {}).get("content"))
    return bool(choices[0].get("text"))


@dataclass(frozen=True)
class ServerTarget:
    base_url: str
    endpoint: str
    model: str
    ignore_eos: bool
    priority: str | None
    response_format: dict | None = None  # every request's

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"

    def payload(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": spec.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": self.ignore_eos,
        }
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            body["prompt"] = spec.prompt
        if self.priority is not None:
            body["priority"] = self.priority
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


async def _error_message(response: aiohttp.ClientResponse) -> str:
    text = await response.text(errors="replace")
    try:
        body = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text.strip()[:MAX_ERROR_CHARS]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error
    return str(error)[:MAX_ERROR_CHARS]


async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord, start: float, endpoint: str) -> None:
    decoder = SSEDecoder()
    last_text_at: float | None = None
    done = False
    while data := await response.content.readany():
        # Chunks that arrive in one read arrived together: they share a timestamp.
        arrived = time.perf_counter()
        for payload in decoder.feed(data):
            if payload == b"[DONE]":
                done = True
                continue
            chunk = msgspec.json.decode(payload)
            if error := chunk.get("error"):
                message = error.get("message", error) if isinstance(error, dict) else error
                raise StreamError(f"error in stream: {str(message)[:MAX_ERROR_CHARS]}")
            if usage := chunk.get("usage"):
                record.prompt_tokens = usage["prompt_tokens"]
                record.completion_tokens = usage["completion_tokens"]
            if chunk_has_text(chunk, endpoint):
                if last_text_at is None:
                    record.ttft = arrived - start
                else:
                    record.itl.append(arrived - last_text_at)
                last_text_at = arrived
    if not done:
        raise StreamError("stream ended before data: [DONE]")
    if record.completion_tokens is None:
        raise StreamError("stream had no usage chunk (stream_options.include_usage)")


async def send_request(
    session: aiohttp.ClientSession, target: ServerTarget, spec: RequestSpec, index: int, level_start: float
) -> RequestRecord:
    """Send one streaming request; any failure is recorded in the result, never raised."""
    record = RequestRecord(index=index, output_len=spec.output_len, input_len=spec.input_len)
    start = time.perf_counter()
    record.start = start - level_start
    try:
        async with session.post(target.url, json=target.payload(spec)) as response:
            record.status = response.status
            if response.status != 200:
                record.error = f"HTTP {response.status}: {await _error_message(response)}"
            else:
                await _read_stream(response, record, start, target.endpoint)
    except StreamError as e:
        record.error = str(e)
    except TimeoutError:
        record.error = "timed out (--timeout)"
    # A malformed chunk (bad JSON, missing keys, wrong types) fails the request, not the run.
    except (aiohttp.ClientError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        record.error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    record.e2e = time.perf_counter() - start
    return record


class LevelProgress:
    """A live progress bar of one level that also shows how many requests failed so far."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True)
        self.failed = 0

    def done(self, record: RequestRecord) -> None:
        if not record.ok:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


async def run_at_concurrency(
    session: aiohttp.ClientSession, target: ServerTarget, specs: list[RequestSpec], concurrency: int, label: str
) -> LevelResult:
    """Keep `concurrency` requests in flight until all of `specs` are sent."""
    records: list[RequestRecord] = [None] * len(specs)  # type: ignore[list-item]
    unsent = iter(range(len(specs)))
    progress = LevelProgress(len(specs), label)

    async def client() -> None:
        # The iterator is shared: each index is taken by exactly one client.
        for i in unsent:
            records[i] = await send_request(session, target, specs[i], i, level_start)
            progress.done(records[i])

    cpu_start = time.process_time()
    level_start, started_unix = time.perf_counter(), time.time()
    await asyncio.gather(*(client() for _ in range(min(concurrency, len(specs)))))
    duration = time.perf_counter() - level_start
    progress.close()
    return LevelResult(concurrency, None, records, duration, time.process_time() - cpu_start,
                       started_unix=started_unix)


async def run_at_rate(
    session: aiohttp.ClientSession, target: ServerTarget, specs: list[RequestSpec], rate: float, seed: int
) -> LevelResult:
    """Send `specs` at Poisson arrival times of mean rate `rate`, however many are in flight."""
    arrivals = poisson_arrival_times(len(specs), rate, np.random.default_rng(seed))
    progress = LevelProgress(len(specs), level_label(None, rate))

    async def timed_request(i: int) -> RequestRecord:
        record = await send_request(session, target, specs[i], i, level_start)
        progress.done(record)
        return record

    cpu_start = time.process_time()
    level_start, started_unix = time.perf_counter(), time.time()
    tasks = []
    for i, arrival in enumerate(arrivals):
        delay = level_start + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(timed_request(i)))
    records = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - level_start
    progress.close()
    return LevelResult(None, rate, records, duration, time.process_time() - cpu_start,
                       started_unix=started_unix)


async def fetch_model_name(session: aiohttp.ClientSession, base_url: str) -> str:
    url = f"{base_url}/v1/models"
    try:
        async with session.get(url) as response:
            if response.status != 200:
                raise BenchmarkSetupError(f"GET {url} answered HTTP {response.status}: {await _error_message(response)}")
            models = (await response.json()).get("data") or []
    except (aiohttp.ClientError, OSError, ValueError) as e:
        raise BenchmarkSetupError(f"cannot list models at {url} ({type(e).__name__}: {e}); pass --model") from None
    if not models:
        raise BenchmarkSetupError(f"GET {url} listed no models; pass --model")
    return models[0]["id"]


def start_gpu_monitor(args: argparse.Namespace) -> GpuMonitor | None:
    """`--gpu-monitor auto` watches the GPU only when there is one here and the server is local."""
    if args.gpu_monitor == "off":
        return None
    if args.gpu_monitor == "auto" and not (GpuMonitor.available() and urlsplit(args.url).hostname in LOCAL_HOSTS):
        return None
    try:
        return GpuMonitor(args.gpu_id)
    except GpuMonitorError as e:
        raise BenchmarkSetupError(f"--gpu-monitor on: {e}") from None


def requests_per_level(args: argparse.Namespace) -> list[int]:
    num_levels = len(args.concurrency or args.request_rate or [])
    return args.requests * num_levels if len(args.requests) == 1 else args.requests


async def run_benchmark(args: argparse.Namespace, workload: Workload,
                        gpu: GpuMonitor | None = None) -> tuple[str, list[LevelResult]]:
    """Warm up, then run every level in order; returns the model name and each level's result."""
    base_url = args.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    concurrencies: list[int] = args.concurrency or []
    # 0 is aiohttp's "no limit": at a request rate, in-flight requests are not capped.
    connector = aiohttp.TCPConnector(limit=max(concurrencies, default=0))
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        model = args.model or await fetch_model_name(session, base_url)
        target = ServerTarget(base_url, args.endpoint, model, args.ignore_eos, args.priority,
                              bench_response_format(args))
        if args.warmup > 0:
            warmup = await run_at_concurrency(
                session, target, workload.take(args.warmup), max(concurrencies, default=args.warmup), "warm-up"
            )
            if warmup.summary["failed"]:
                first_error = next(iter(warmup.summary["errors"]))
                print(f"warning: {warmup.summary['failed']} warm-up requests failed: {first_error}", file=sys.stderr)
        levels = []
        counts = iter(requests_per_level(args))
        for concurrency in concurrencies:
            specs = workload.take(next(counts))
            levels.append(await run_at_concurrency(session, target, specs, concurrency, level_label(concurrency, None)))
            _attach_gpu_usage(levels[-1], gpu)
        for i, rate in enumerate(args.request_rate or []):
            specs = workload.take(next(counts))
            levels.append(await run_at_rate(session, target, specs, rate, args.seed + i))
            _attach_gpu_usage(levels[-1], gpu)
    return model, levels


def _attach_gpu_usage(level: LevelResult, gpu: GpuMonitor | None) -> None:
    if gpu is not None:
        level.gpu = gpu.usage(level.started_unix, level.started_unix + level.duration)


def _positive_int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates (numbers or inf)") from None
    if any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every request rate must be > 0")
    return values


def length_range_argument(text: str) -> LengthRange:
    try:
        return parse_length_range(text)
    except WorkloadError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://localhost:8081", help="server base URL")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                        help="/v1/completions or /v1/chat/completions (chat needs --prompt-file)")
    parser.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", metavar="KEY", help="Bearer token")
    parser.add_argument("--concurrency", type=_positive_int_list, metavar="N[,N...]",
                        help="comma-separated requests in flight per level, e.g. 1,5,10 (default: 1)")
    parser.add_argument("--request-rate", type=_rate_list, metavar="R[,R...]",
                        help="comma-separated Poisson request rates per level in req/s, inf = all at once; "
                             "instead of --concurrency")
    parser.add_argument("--requests", type=_positive_int_list, default=[100], metavar="N[,N...]",
                        help="requests per level: one number for all, or one per level")
    parser.add_argument("--input-len", type=length_range_argument, metavar="A[:B]",
                        help=f"random prompt length in tokens, A or A:B (default: {DEFAULT_INPUT_LEN})")
    parser.add_argument("--output-len", type=length_range_argument, metavar="A[:B]",
                        default=parse_length_range(DEFAULT_OUTPUT_LEN),
                        help=f"max_tokens per request, A or A:B (default: {DEFAULT_OUTPUT_LEN})")
    parser.add_argument("--prompt-file", type=Path, help="text prompts, one per line (instead of random token ids)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="random token ids are drawn from [0, this)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction,
                        help="generate exactly --output-len tokens (default: on for random prompts)")
    parser.add_argument("--priority", choices=PRIORITIES, help="request priority (default: the server's)")
    parser.add_argument("--json-schema", action="store_true",
                        help="every request constrained to BENCH_SCHEMA (response_format json_schema), a list of "
                             "records too long to close: structured outputs' throughput against a run without")
    parser.add_argument("--structural-tag", action="store_true",
                        help="every request a structural tag: free text with BENCH_SCHEMA as a call behind a "
                             "<tool_call> trigger (response_format structural_tag)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    parser.add_argument("--warmup", type=int, default=0, help="uncounted requests sent before the first level")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-request timeout in seconds")
    parser.add_argument("--output-file", type=Path, help="write every request and each level's summary as JSON")
    parser.add_argument("--plot", type=Path, help="write TTFT, TPOT and throughput per level as a PNG")
    parser.add_argument("--gpu-monitor", choices=("auto", "on", "off"), default="auto",
                        help="sample GPU utilisation and memory with nvidia-smi during each level "
                             "(auto: when nvidia-smi is here and --url is this machine)")
    parser.add_argument("--gpu-id", type=int, default=0, help="the GPU that --gpu-monitor watches (nvidia-smi index)")


def bench_response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """Every request's response_format: --json-schema's, --structural-tag's, or none."""
    if args.json_schema:
        return {"type": "json_schema", "json_schema": {"name": "bench", "schema": BENCH_SCHEMA}}
    if args.structural_tag:
        return {"type": "structural_tag", **BENCH_STRUCTURAL_TAG}
    return None


def _check_arguments(args: argparse.Namespace) -> None:
    """Fill defaults that depend on other options; raise OptionError for contradictions."""
    if args.concurrency and args.request_rate:
        raise OptionError("give --concurrency or --request-rate, not both")
    if not args.request_rate:
        args.concurrency = args.concurrency or [1]
    if args.warmup < 0:
        raise OptionError("--warmup must be at least 0")
    if args.json_schema and args.structural_tag:
        raise OptionError("give --json-schema or --structural-tag, not both: a request has one constraint")
    num_levels = len(args.concurrency or args.request_rate)
    if len(args.requests) not in (1, num_levels):
        raise OptionError(f"--requests has {len(args.requests)} values for {num_levels} levels: give one, or one "
                          "per level")
    if args.prompt_file is not None:
        if args.input_len is not None:
            raise OptionError("--input-len sets random prompts; --prompt-file prompts have their own lengths")
        args.ignore_eos = bool(args.ignore_eos)
    else:
        if args.endpoint == "chat":
            raise OptionError("--endpoint chat needs --prompt-file: random prompts are token ids, "
                                "which only /v1/completions accepts")
        args.input_len = args.input_len or parse_length_range(DEFAULT_INPUT_LEN)
        args.ignore_eos = args.ignore_eos is not False


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if every counted request succeeded, 1 if any failed, 2 on bad options."""
    try:
        _check_arguments(args)
        workload: Workload = (
            PromptFileWorkload(args.prompt_file, args.output_len, args.seed)
            if args.prompt_file is not None
            else RandomTokenWorkload(args.input_len, args.output_len, args.vocab_size, args.seed)
        )
    except (OptionError, WorkloadError, OSError) as e:
        print(f"sfllm bench serve: {e}", file=sys.stderr)
        return 2
    gpu = None
    try:
        gpu = start_gpu_monitor(args)
        model, levels = asyncio.run(run_benchmark(args, workload, gpu))
    except BenchmarkSetupError as e:
        print(f"sfllm bench serve: {e}", file=sys.stderr)
        return 1
    finally:
        if gpu is not None and (gpu_errors := gpu.stop()):
            print(f"sfllm bench serve: nvidia-smi: {gpu_errors}", file=sys.stderr)
    counts = requests_per_level(args)
    per_level = f"{counts[0]}" if len(set(counts)) == 1 else ",".join(map(str, counts))
    print(f"model {model} at {args.url}, {args.endpoint}, {per_level} requests per level")
    print(format_table(levels))
    if args.output_file is not None:
        write_json(args.output_file, config_json(args, model), levels)
    if args.plot is not None:
        plot(levels, args.plot, "concurrency" if args.concurrency else "request rate (req/s)")
    return 1 if any(level.summary["failed"] for level in levels) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sfllm bench serve", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
