"""Requests the server turned away or cut short (503, 504) in the log at the default level, one line per
interval at most: without it a full queue or a request timeout showed only in /metrics and the access log,
which is off by default. The line after a quiet interval counts what the interval held back."""
from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

logger = logging.getLogger(__name__)

INTERVAL_S = 10.0
# What each code means to an operator, and the setting behind it
WHY = {
    "engine_overloaded": "the engine's waiting queue is full (--max-waiting-requests)",
    "request_timeout": "it ran past --request-timeout-s",
    "server_draining": "this frontend is draining",
    "server_shutdown": "the server stopped before it finished",
    "engine_unavailable": "the engine is not answering",
}


class RefusalLog:
    def __init__(self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last_line: float | None = None
        self._held: Counter[str] = Counter()

    def note(self, status: int, code: str | None, path: str) -> None:
        """A request on `path` answered `status` (in its status line or, for a stream, its error event)."""
        what = f"{status} {code or 'error'}"
        now = self._clock()
        if self._last_line is not None and now - self._last_line < self.interval_s:
            self._held[what] += 1
            return
        if self._held:
            held = ", ".join(f"{count} x {name}" for name, count in self._held.most_common())
            logger.warning("%d more requests refused or cut short in the %.0f s before: %s",
                           sum(self._held.values()), now - self._last_line, held)
            self._held.clear()
        reason = WHY.get(code or "", "see the answer's message")
        logger.warning("a request on %s answered %s: %s (one such line per %g s at most; /metrics counts them all)",
                       path, what, reason, self.interval_s)
        self._last_line = now
