"""The waiting requests, one queue per priority class, and the order they are admitted in."""
from __future__ import annotations

from collections import deque

from sfllm.scheduler.length_buckets import order_by_length_bucket
from sfllm.scheduler.priority import PRIORITY_RANK, split_slots
from sfllm.scheduler.request import Request


class QueueFull(RuntimeError):
    pass


QUEUE_FULL_STATUS = 503  # a request refused for a full queue: retryable, unlike the 400s of bad requests


class WaitingQueue:
    def __init__(self, policy: str = "fcfs", background_share: float = 0.5, max_background_wait_s: float = 30.0,
                 max_per_class: int = 4096) -> None:
        self.policy = policy
        self.background_share = background_share
        self.max_background_wait_s = max_background_wait_s
        self.max_per_class = max_per_class
        self._queues: dict[str, deque[Request]] = {name: deque() for name in PRIORITY_RANK}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __iter__(self):
        for queue in self._queues.values():
            yield from queue

    def counts(self) -> dict[str, int]:
        return {name: len(q) for name, q in self._queues.items()}

    def num_waiting(self, priority: str) -> int:
        return len(self._queues[priority])

    def full_message(self, priority: str) -> str | None:
        """Why a request of `priority` cannot be queued now; None while there is room."""
        held = len(self._queues[priority])
        return f"the {priority} queue holds {held} requests, its limit" if held >= self.max_per_class else None

    def add(self, request: Request, now: float) -> None:
        full = self.full_message(request.priority)
        if full is not None:
            raise QueueFull(full)
        request.enqueue_time = request.waiting_since = now
        self._queues[request.priority].append(request)

    def requeue(self, request: Request, now: float) -> None:
        """A preempted request goes back to the head of its class. Its wait for aging starts
        again: the time it ran is no wait."""
        request.waiting_since = now
        self._queues[request.priority].appendleft(request)

    def remove(self, request: Request) -> None:
        self._queues[request.priority].remove(request)

    def is_aged(self, request: Request, now: float) -> bool:
        """A background request that waited past the bound is admitted like high priority."""
        return request.aged or (request.priority == "background"
                                and now - request.waiting_since >= self.max_background_wait_s)

    def _ordered(self, requests: list[Request]) -> list[Request]:
        if self.policy != "length-bucket":
            return requests
        resumed = [r for r in requests if r.num_preemptions]
        fresh = [r for r in requests if not r.num_preemptions]
        return resumed + order_by_length_bucket(fresh)

    def ranked_high(self, now: float) -> list[Request]:
        """The waiting requests admitted like high priority, in the order of `candidates`: high priority, then
        aged background (paused first). Cheaper than `candidates` when many lower requests wait."""
        aged = [r for r in self._queues["background"] if self.is_aged(r, now)]
        return (self._ordered(list(self._queues["high"])) + [r for r in aged if r.is_paused]
                + [r for r in aged if not r.is_paused])

    def candidates(self, now: float, free_slots: int) -> list[Request]:
        """Waiting requests in admission order, as many as the free slots allow: high priority,
        then background requests that high priority paused (they resume with a decode, and their
        KV blocks come back sooner), then aged background, then normal and background by their shares."""
        if free_slots <= 0:  # the answer, without sorting every waiting request into it
            return []
        background = list(self._queues["background"])
        paused = [r for r in background if r.is_paused]
        background = [r for r in background if not r.is_paused]
        aged = [r for r in background if self.is_aged(r, now)]
        background = [r for r in background if not self.is_aged(r, now)]
        first = self._ordered(list(self._queues["high"])) + paused + aged
        rest = max(free_slots - len(first), 0)
        normal = self._ordered(list(self._queues["normal"]))
        normal_slots, background_slots = split_slots(rest, len(normal), len(background), self.background_share)
        return first[:free_slots] + normal[:normal_slots] + self._ordered(background)[:background_slots]
