"""`sfllm bench priority`: a high-priority request's TTFT alone and under a flood of background requests.

Probes (high priority, streamed, a few output tokens) are sent one after another on an idle
server; then `--concurrency` background streams start, and once all of them are sent and the
server streams tokens for one, the same number of probes are sent one after another again.
The flood is cancelled when the last probe is done. Every probe has its own random prompt:
a repeated prompt would be served from the prefix cache under load and look cheaper.

The flood runs in a process of its own (flood_process.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

from sfllm.bench.flood_process import FloodOutcome, FloodProcess
from sfllm.bench.serve import BenchmarkSetupError, ServerTarget, fetch_model_name, length_range_argument, send_request
from sfllm.bench.serve_report import RequestRecord, error_summary, latency_stats_ms
from sfllm.bench.workload import RandomTokenWorkload, RequestSpec, parse_length_range

DESCRIPTION = "Measure a high-priority request's TTFT alone and under a flood of background requests."
TTFT_STATS = ("p50", "p90", "max")


@dataclass
class ProbeSeries:
    """The probes of one phase, in the order they were sent."""

    name: str
    records: list[RequestRecord] = field(default_factory=list)
    # background requests in flight when each probe was sent (empty for the probes alone)
    flood_in_flight: list[int] = field(default_factory=list)

    @property
    def ttft_ms(self) -> dict[str, float | None]:
        ok = [r.ttft for r in self.records if r.ok and r.ttft is not None]
        stats = latency_stats_ms(ok)
        return {name: stats[name] for name in TTFT_STATS}

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if not r.ok or r.ttft is None)

    def to_json(self) -> dict[str, Any]:
        return {"ttft_ms": self.ttft_ms, "failed": self.failed, "errors": error_summary(self.records),
                "flood_in_flight": self.flood_in_flight, "requests": [r.to_json() for r in self.records]}


@dataclass
class PriorityResult:
    alone: ProbeSeries
    under_load: ProbeSeries
    flood: FloodOutcome
    concurrency: int

    @property
    def ttft_ratio(self) -> float | None:
        """p50 TTFT under load over p50 TTFT alone."""
        alone, loaded = self.alone.ttft_ms["p50"], self.under_load.ttft_ms["p50"]
        return None if not alone or loaded is None else loaded / alone

    @property
    def probes_below_concurrency(self) -> int:
        """Probes sent while fewer than `concurrency` background requests were in flight (the flood ran out)."""
        return sum(1 for n in self.under_load.flood_in_flight if n < self.concurrency)

    def to_json(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"config": config, "alone": self.alone.to_json(), "under_load": self.under_load.to_json(),
                "ttft_p50_ratio": self.ttft_ratio, "probes_below_concurrency": self.probes_below_concurrency,
                "flood": self.flood.to_json()}


def format_report(result: PriorityResult) -> str:
    rows = [("", ["alone", "under load"]),
            ("probes", [str(len(s.records)) for s in (result.alone, result.under_load)]),
            ("failed", [str(s.failed) for s in (result.alone, result.under_load)])]
    for stat in TTFT_STATS:
        rows.append((f"TTFT {stat} (ms)", ["-" if (v := s.ttft_ms[stat]) is None else f"{v:.1f}"
                                           for s in (result.alone, result.under_load)]))
    width = max(len(title) for title, _ in rows)
    lines = [title.ljust(width) + "".join(cell.rjust(12) for cell in cells) for title, cells in rows]
    ratio = result.ttft_ratio
    lines.append(f"TTFT p50 under load / alone: {'-' if ratio is None else f'{ratio:.2f}x'}")
    flood = result.flood.to_json()
    lines.append(f"background: {flood['sent']} sent, {flood['completed']} completed, {flood['failed']} failed, "
                 f"{flood['cancelled']} cancelled after the last probe")
    if result.probes_below_concurrency:
        lines.append(f"warning: {result.probes_below_concurrency} probes were sent with fewer than "
                     f"{result.concurrency} background requests in flight; raise --background-requests")
    named = ((result.alone.name, result.alone.records), (result.under_load.name, result.under_load.records),
             ("background", result.flood.records))
    for name, records in named:
        for message, count in error_summary(records).items():
            lines.append(f"{name}: {count} failed: {message}")
    return "\n".join(lines)


async def send_probes(session: aiohttp.ClientSession, target: ServerTarget, specs: list[RequestSpec],
                      series: ProbeSeries, flood: FloodProcess | None = None) -> None:
    start = time.perf_counter()
    for index, spec in enumerate(specs):
        if flood is not None:
            series.flood_in_flight.append(flood.in_flight)
        series.records.append(await send_request(session, target, spec, index, start))


async def run_benchmark(args: argparse.Namespace) -> tuple[str, PriorityResult]:
    base_url = args.url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    probes = RandomTokenWorkload(args.probe_input_len, args.probe_output_len, args.vocab_size, args.seed)
    background = RandomTokenWorkload(args.input_len, args.output_len, args.vocab_size, args.seed + 1)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as probe_session:
        model = args.model or await fetch_model_name(probe_session, base_url)
        probe_target = ServerTarget(base_url, "completions", model, True, "high")
        flood_target = ServerTarget(base_url, "completions", model, True, "background")
        alone, under_load = ProbeSeries("alone"), ProbeSeries("under load")
        await send_probes(probe_session, probe_target, probes.take(args.warmup), ProbeSeries("warm-up"))
        await send_probes(probe_session, probe_target, probes.take(args.probes), alone)
        flood = FloodProcess(flood_target, background.take(args.background_requests), args.concurrency,
                             args.timeout, headers)
        try:
            await flood.running(args.concurrency)
            await send_probes(probe_session, probe_target, probes.take(args.probes), under_load, flood)
        finally:
            outcome = flood.stop()
    return model, PriorityResult(alone, under_load, outcome, args.concurrency)


def config_json(args: argparse.Namespace, model: str) -> dict[str, Any]:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "url": args.url, "model": model,
            "probes": args.probes, "warmup": args.warmup, "probe_input_len": str(args.probe_input_len),
            "probe_output_len": str(args.probe_output_len), "background_requests": args.background_requests,
            "concurrency": args.concurrency, "input_len": str(args.input_len), "output_len": str(args.output_len),
            "vocab_size": args.vocab_size, "seed": args.seed, "timeout": args.timeout}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://localhost:8081", help="server base URL")
    parser.add_argument("--model", help="model name to request (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", metavar="KEY", help="Bearer token")
    parser.add_argument("--probes", type=_positive_int, default=10, help="high-priority probes alone, and again "
                                                                         "under load")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted probes sent first")
    parser.add_argument("--probe-input-len", type=length_range_argument, default=parse_length_range("128"),
                        metavar="A[:B]", help="probe prompt length in random token ids")
    parser.add_argument("--probe-output-len", type=length_range_argument, default=parse_length_range("8"),
                        metavar="A[:B]", help="probe max_tokens")
    parser.add_argument("--background-requests", type=_positive_int, default=600,
                        help="background requests at most; the flood is cancelled after the last probe")
    parser.add_argument("--concurrency", type=_positive_int,
                        help="background requests in flight (default: --background-requests, all at once)")
    parser.add_argument("--input-len", type=length_range_argument, default=parse_length_range("1024"),
                        metavar="A[:B]", help="background prompt length in random token ids")
    parser.add_argument("--output-len", type=length_range_argument, default=parse_length_range("512"),
                        metavar="A[:B]", help="background max_tokens (ignore_eos is on)")
    parser.add_argument("--vocab-size", type=int, default=32000, help="random token ids are drawn from [0, this)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the prompts (the probes' are `sfllm bench serve --seed` S's at the same lengths: "
                             "against a server that ran it, take another, or its prefix cache serves them)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per-request timeout in seconds")
    parser.add_argument("--output-file", type=Path, help="write the probes, the flood and the ratio as JSON")


def run(args: argparse.Namespace) -> int:
    """0 if every probe succeeded, 1 otherwise, 2 on bad options."""
    if args.concurrency is None:
        args.concurrency = args.background_requests
    if args.concurrency > args.background_requests:
        print("sfllm bench priority: --concurrency is more than --background-requests", file=sys.stderr)
        return 2
    if args.warmup < 0:
        print("sfllm bench priority: --warmup must be at least 0", file=sys.stderr)
        return 2
    try:
        model, result = asyncio.run(run_benchmark(args))
    except BenchmarkSetupError as e:
        print(f"sfllm bench priority: {e}", file=sys.stderr)
        return 1
    print(f"model {model} at {args.url}: {args.probes} high-priority probes of {args.probe_input_len} prompt and "
          f"{args.probe_output_len} output tokens; {args.concurrency} background streams of {args.input_len} prompt "
          f"and {args.output_len} output tokens")
    print(format_report(result))
    if args.output_file is not None:
        args.output_file.write_text(json.dumps(result.to_json(config_json(args, model))))
    return 1 if result.alone.failed or result.under_load.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sfllm bench priority", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
