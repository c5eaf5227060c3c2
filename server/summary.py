"""Log lines for events that come by the thousand: one by one, but counts for a burst.

Ten thousand clients joining, or hundreds of calls that their clients cancelled, would bury the
rounds in a log a person reads. An EventSummary logs each event as it comes unless more than
`first` arrived within the last `interval_s` (a burst); a burst's further events are counted,
at most one line per `interval_s` saying how many more there were and how many in all
("clients joined: 9990 more in the last 10 s, 10000 in all"). Once the burst is over, events
are logged one by one again, and an event marked `always` (a client joining again) is logged
one by one even in a burst. A count still unreported is logged by flush() (the server calls it
when it stops) or, on an event loop, once the interval has passed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
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
        # The times of the latest first + 1 events: all within interval_s means a burst.
        self._recent: deque[float] = deque(maxlen=first + 1)

    def event(self, message: str, *args: object, always: bool = False) -> None:
        """One event: logged as `message % args` unless it is part of a burst (and not `always`),
        else counted."""
        with self._lock:
            self.total += 1
            now = self._clock()
            self._recent.append(now)
            burst = len(self._recent) > self._first and now - self._recent[0] < self._interval_s
            if always or not burst:
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
