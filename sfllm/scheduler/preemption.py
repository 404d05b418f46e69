"""Which running request gives way when room is needed."""
from __future__ import annotations

from collections.abc import Iterable

from sfllm.scheduler.request import Request


def choose_victim(candidates: Iterable[Request]) -> Request | None:
    """The lowest-class, newest request among `candidates` (an aged background request ranks as high)."""
    best: Request | None = None
    for request in candidates:
        if best is None or (request.rank, request.arrival_time) > (best.rank, best.arrival_time):
            best = request
    return best


def may_push_out(waiting: Request, running: Request) -> bool:
    """Whether `waiting`, which ranks as high, may preempt `running` to get in.

    A high-priority request may push out any normal or background work, aged background
    too (choose_victim takes aged requests last): aging bounds background's wait behind
    normal work, not behind high priority. An aged background request pushes out normal
    work only: behind other background work, first come first served bounds its wait, and
    pushing that out would only trade one prefill for another."""
    if waiting.priority == "high":
        return running.priority != "high"
    return running.priority == "normal"
