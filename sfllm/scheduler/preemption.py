"""Which running request gives way when room is needed."""
from __future__ import annotations

from collections.abc import Iterable

from sfllm.scheduler.request import Request


def choose_victim(candidates: Iterable[Request], below_rank: int | None = None) -> Request | None:
    """The lowest-class, newest request among `candidates` (an aged background request ranks as high).

    With `below_rank`, only requests of a strictly lower class than that rank qualify
    (a high-priority arrival may only push out normal and background work)."""
    best: Request | None = None
    for request in candidates:
        if below_rank is not None and request.rank <= below_rank:
            continue
        if best is None or (request.rank, request.arrival_time) > (best.rank, best.arrival_time):
            best = request
    return best
