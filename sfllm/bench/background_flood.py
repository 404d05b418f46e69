"""The background flood of `sfllm bench priority`, in a process of its own.

Streams of 600 requests bring the client tens of thousands of SSE events a second (one per running
request per step). Read by the probes' own event loop, they queued every probe's reads behind them, and
the probe's first token was measured late by the client's backlog, not the server's: a probe that decoded
at the server's 9 ms a step waited 23-49 ms for its first token (docs/performance.md). Here the flood has
its own process and event loop; the probes' process only reads two counters it shares.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sfllm.bench.serve import ServerTarget, send_request
from sfllm.bench.serve_report import RequestRecord, error_summary
from sfllm.bench.workload import RequestSpec

POLL_S = 0.01
RESULT_WAIT_S = 60.0  # for the flood's records after the stop: it cancels its streams and sends them


@dataclass
class FloodOutcome:
    """The background requests: how many were sent, and how those that ended before the cancel did."""

    sent: int = 0
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return self.sent - len(self.records)

    def to_json(self) -> dict[str, Any]:
        ok = [r for r in self.records if r.ok]
        return {"sent": self.sent, "completed": len(ok), "failed": len(self.records) - len(ok),
                "cancelled": self.in_flight, "errors": error_summary(self.records),
                "output_tokens": sum(r.completion_tokens or 0 for r in ok)}


class BackgroundFlood:
    """Keeps `concurrency` background requests in flight from another process until `stop` (or the specs
    run out); `in_flight` and `started` read what it shares as it goes."""

    def __init__(self, target: ServerTarget, specs: list[RequestSpec], concurrency: int, headers: dict[str, str],
                 timeout_s: float) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of this one's event loop
        self.concurrency = concurrency
        self._sent = context.Value("i", 0)
        self._ended = context.Value("i", 0)
        self._answered = context.Event()  # the server answered one of the flood's requests
        self._finished = context.Event()  # every spec was sent and ended
        self._stop = context.Event()
        self._results = context.Queue()
        self._process = context.Process(target=_flood_main, daemon=True, name="sfllm-bench-flood", args=(
            target, specs, concurrency, headers, timeout_s, self._sent, self._ended, self._answered,
            self._finished, self._stop, self._results))
        self._process.start()

    @property
    def in_flight(self) -> int:
        return self._sent.value - self._ended.value

    async def started(self) -> None:
        """Returns once all `concurrency` requests are sent and the server answered one (it answers a stream
        with its first token), or the flood ended by itself."""
        while not self._finished.is_set() and self._process.is_alive():
            if self._sent.value >= self.concurrency and self._answered.is_set():
                return
            await asyncio.sleep(POLL_S)

    def stop(self) -> FloodOutcome:
        """Cancels the requests still in flight; the outcome of those sent."""
        self._stop.set()
        try:
            outcome = self._results.get(timeout=RESULT_WAIT_S)
        except queue.Empty:  # the process died: its counts, without the records
            outcome = FloodOutcome(sent=self._sent.value)
        self._process.join(timeout=RESULT_WAIT_S)
        if self._process.is_alive():
            self._process.kill()
        return outcome


def _flood_main(target: ServerTarget, specs: list[RequestSpec], concurrency: int, headers: dict[str, str],
                timeout_s: float, sent, ended, answered, finished, stop, results) -> None:
    results.put(asyncio.run(_flood(target, specs, concurrency, headers, timeout_s, sent, ended, answered, finished,
                                   stop)))


async def _flood(target: ServerTarget, specs: list[RequestSpec], concurrency: int, headers: dict[str, str],
                 timeout_s: float, sent, ended, answered, finished, stop) -> FloodOutcome:
    async def on_request_end(*_: object) -> None:
        answered.set()

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    outcome = FloodOutcome()
    unsent = iter(enumerate(specs))
    start = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        for index, spec in unsent:
            outcome.sent += 1
            sent.value = outcome.sent
            outcome.records.append(await send_request(session, target, spec, index, start))
            ended.value = len(outcome.records)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers, trace_configs=[trace],
                                     connector=connector) as session:
        clients = asyncio.gather(*(client(session) for _ in range(concurrency)))
        while not clients.done() and not stop.is_set():
            await asyncio.sleep(POLL_S)
        if clients.done():
            finished.set()
        clients.cancel()
        await asyncio.gather(clients, return_exceptions=True)
    return outcome
