"""Every refusal the coordinator answers, logged so that no peer can flood the log.

The first refusal of a kind (peer address and status code) is logged at once; more of the
same within a minute are counted, and the next line after the minute says how many there
were. What a refusal message quotes of the client's input is already escaped (`repr`) by the
check that raised it. The table of kinds is capped, so a peer that rotates its address cannot
grow it without bound either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fedgrpc.server.refusals")

WINDOW_S = 60.0
MAX_KINDS = 4096


#: Told of every refusal, rate limit or not: (address, code, what, message, client id if known).
Listener = Callable[[str, str, str, str, "int | None"], None]


class RefusalLog:
    def __init__(self, window_s: float = WINDOW_S, listener: Listener | None = None) -> None:
        self._window_s = window_s
        self._kinds: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._listener = listener
        self.total = 0

    def refused(self, address: str, code: str, what: str, message: str, client_id: int | None = None) -> None:
        if self._listener is not None:
            self._listener(address, code, what, message, client_id)
        now = time.monotonic()
        with self._lock:
            self.total += 1
            key = (address, code)
            last, suppressed = self._kinds.get(key, (-self._window_s, 0))
            if now - last < self._window_s:
                self._kinds[key] = (last, suppressed + 1)
                return
            if len(self._kinds) >= MAX_KINDS:
                self._kinds.clear()
            self._kinds[key] = (now, 0)
        more = f" (and {suppressed} more {code} from there in the last minute)" if suppressed else ""
        log.warning("refused %s from %s: %s %s%s", what, address, code, message, more)
