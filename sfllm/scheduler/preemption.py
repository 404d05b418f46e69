"""Which running request gives way when room is needed."""
from __future__ import annotations

from collections.abc import Iterable

from sfllm.scheduler.priority import PRIORITY_RANK
from sfllm.scheduler.request import Request


def choose_victim(candidates: Iterable[Request]) -> Request | None:
    """The lowest-ranked, newest request among `candidates`. An aged background request ranks as high, but
    below a request of the high class itself: a high-priority request that needs blocks pushes it out rather
    than itself (it did, being the newer, while the aged one sat out its steps: neither ever finished)."""
    return max(candidates, key=_victim_order, default=None)


def _victim_order(request: Request) -> tuple[int, int, float]:
    return request.rank, PRIORITY_RANK[request.priority], request.arrival_time


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
