"""The background requests of `sfllm bench priority`, sent and read by a process of their own.

Reading hundreds of streams (~30k tokens a second from one H200) keeps a Python client's event loop busy,
and a probe timed on that loop waits for it (on one server, the probes' p50 under load came out 1-2.5 ms
lower with the flood here: docs/performance.md, sixth session). The child shares its counts with the
probes' process and hands back its records when stopped.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sfllm.bench.serve import BenchmarkSetupError, ServerTarget, send_request
from sfllm.bench.serve_report import RequestRecord, error_summary
from sfllm.bench.workload import RequestSpec


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


async def run_flood(session: aiohttp.ClientSession, target: ServerTarget, specs: list[RequestSpec],
                    concurrency: int, flood: FloodOutcome) -> None:
    """Keeps `concurrency` background requests in flight until `specs` run out or it is cancelled."""
    unsent = iter(enumerate(specs))
    start = time.perf_counter()

    async def client() -> None:
        for index, spec in unsent:
            flood.sent += 1
            flood.records.append(await send_request(session, target, spec, index, start))

    await asyncio.gather(*(client() for _ in range(concurrency)))


@dataclass
class _SharedState:
    """What the child shares with the probes' process while it runs: multiprocessing Values of int without locks
    (a child killed while it held a lock would hang the probes' process at its next read). Each has one writer."""

    sent: Any  # requests sent, and of those,
    finished: Any  # finished
    answered: Any  # 1: the server answered a background request (it streams for the flood)
    done: Any  # 1: every request sent and finished
    stop: Any  # 1: the probes' process asks the child to cancel what is in flight and hand back its records

    @classmethod
    def create(cls, context: Any) -> "_SharedState":
        return cls(*(context.Value("i", 0, lock=False) for _ in range(5)))


class FloodProcess:
    """The background requests, sent and read by a child process; its counts shared with this one."""

    def __init__(self, target: ServerTarget, specs: list[RequestSpec], concurrency: int, timeout: float,
                 headers: dict[str, str]) -> None:
        context = multiprocessing.get_context("spawn")  # no copy of this process's event loop
        self._state = _SharedState.create(context)
        self._records, child_end = context.Pipe(duplex=False)
        self._process = context.Process(target=_flood_process_main, daemon=True,
                                        args=(target, specs, concurrency, timeout, headers, self._state, child_end))
        self._process.start()
        child_end.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def in_flight(self) -> int:
        state = self._state
        if not self._process.is_alive() and not state.done.value:
            return 0  # the child died: nothing of its is in flight
        finished = state.finished.value  # read before `sent`, which the child writes first: never under-counted
        return state.sent.value - finished

    async def running(self, concurrency: int) -> None:
        """Returns once `concurrency` requests are sent and the server answered one (or the flood ended)."""
        state = self._state
        while not state.done.value and self._process.is_alive() and (
                state.sent.value < concurrency or not state.answered.value):
            await asyncio.sleep(0.01)
        if not state.done.value and not self._process.is_alive():
            raise BenchmarkSetupError(f"the flood's process exited ({self._process.exitcode}) before the flood ran")

    def stop(self, wait_s: float = 60.0) -> FloodOutcome:
        """Cancels what is in flight; the requests sent and the records of those that ended."""
        self._state.stop.value = 1
        outcome = FloodOutcome(sent=self._state.sent.value)
        try:
            if self._records.poll(wait_s):
                outcome.sent, outcome.records = self._records.recv()
        except EOFError:  # the child died without its records: what it sent stays counted, as cancelled
            pass
        self._process.join(5.0)
        if self._process.is_alive():
            self._process.kill()
        return outcome


def _flood_process_main(target: ServerTarget, specs: list[RequestSpec], concurrency: int, timeout: float,
                        headers: dict[str, str], state: _SharedState, records) -> None:
    # Ctrl-C reaches the whole process group: the probes' process stops the flood, this one only follows
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    flood = asyncio.run(_flood_until_stopped(target, specs, concurrency, timeout, headers, state))
    try:
        records.send((flood.sent, flood.records))
    except OSError:  # the probes' process is gone: nobody reads the records
        pass
    records.close()


async def _flood_until_stopped(target: ServerTarget, specs: list[RequestSpec], concurrency: int, timeout: float,
                               headers: dict[str, str], state: _SharedState) -> FloodOutcome:
    async def on_request_end(*_: object) -> None:
        state.answered.value = 1

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    flood = FloodOutcome()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), headers=headers,
                                     trace_configs=[trace], connector=connector) as session:
        task = asyncio.create_task(run_flood(session, target, specs, concurrency, flood))
        parent = multiprocessing.parent_process()
        # a probes' process killed outright sets no stop: the flood ends with it, not with the server
        while not state.stop.value and not task.done() and parent.is_alive():
            state.sent.value, state.finished.value = flood.sent, len(flood.records)
            await asyncio.sleep(0.005)
        state.sent.value, state.finished.value = flood.sent, len(flood.records)
        if task.done():
            state.done.value = 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return flood
