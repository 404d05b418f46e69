"""Which running request gives way when room is needed."""
from __future__ import annotations

from collections.abc import Iterable

from sfllm.scheduler.priority import PRIORITY_RANK
from sfllm.scheduler.request import Request


def choose_victim(candidates: Iterable[Request], below_rank: int | None = None) -> Request | None:
    """The lowest-class, newest request among `candidates`.

    With `below_rank`, only requests of a strictly lower class than that rank qualify
    (a high-priority arrival may only push out normal and background work)."""
    best: Request | None = None
    for request in candidates:
        rank = PRIORITY_RANK[request.priority]
        if below_rank is not None and rank <= below_rank:
            continue
        if best is None or (rank, request.arrival_time) > (PRIORITY_RANK[best.priority], best.arrival_time):
            best = request
    return best
