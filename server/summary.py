"""Log lines for events that come by the thousand: the first few one by one, then counts.

Ten thousand clients joining, or hundreds of calls that their clients cancelled, would bury the
rounds in a log a person reads. An EventSummary logs its first `first` events as they come,
then at most one line per `interval_s` saying how many more there were and how many in all
("clients joined: 9990 more in the last 10 s, 10000 in all");
a count still unreported is logged by flush() (the server calls it when it stops) or, on an
event loop, once the interval has passed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

FIRST = 10
INTERVAL_S = 10.0


class EventSummary:
    """`what` names the events in a count line: "clients joined", "calls cancelled by their client"."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        first: int = FIRST,
        interval_s: float = INTERVAL_S,
        level: int = logging.INFO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._what, self._first, self._interval_s = logger, what, first, interval_s
        self._level, self._clock = level, clock
        self._lock = threading.Lock()
        self.total = 0
        self._pending = 0  # counted since the last line
        self._last_line = -interval_s
        self._flush_scheduled = False

    def event(self, message: str, *args: object) -> None:
        """One event: logged as `message % args` while among the first, else counted."""
        with self._lock:
            self.total += 1
            if self.total <= self._first:
                self._last_line = self._clock()
                line: tuple[str, tuple[object, ...]] | None = (message, args)
            else:
                self._pending += 1
                line = self._count_line() if self._clock() - self._last_line >= self._interval_s else None
                if line is None and not self._flush_scheduled:
                    self._flush_scheduled = self._schedule_flush()
        if line is not None:
            self._log.log(self._level, line[0], *line[1])

    def flush(self) -> None:
        """Log the count not yet reported, if any."""
        with self._lock:
            self._flush_scheduled = False
            line = self._count_line() if self._pending else None
        if line is not None:
            self._log.log(self._level, line[0], *line[1])

    def _count_line(self) -> tuple[str, tuple[object, ...]]:
        """The line for the pending count (lock held); resets it."""
        now = self._clock()
        more = " more" if self.total > self._pending else ""
        since = now - self._last_line if self._last_line >= 0 else self._interval_s
        line = (f"%s: %d{more} in the last %.0f s, %d in all", (self._what, self._pending, since, self.total))
        self._pending, self._last_line = 0, now
        return line

    def _schedule_flush(self) -> bool:
        """On an event loop: flush once the interval has passed, so the last count is not left
        waiting for an event that may never come (lock held). Elsewhere: the next event or
        flush() reports it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_later(max(0.0, self._last_line + self._interval_s - self._clock()), self.flush)
        return True
