"""Every refusal the coordinator answers, logged so that no peer can flood the log.

The first refusal of a kind (peer address, client id when known, and status code) is logged at
once; more of the same within a minute are counted, and the next line of that kind after the
minute says how many there were. So a second client refused from the same host shows at once,
however often the first one is refused. A client id claimed by a peer that has not proven it
could be rotated to make every refusal a new kind: one address gets at most
`LINES_PER_ADDRESS` lines a minute, whatever the ids, and the rest are counted. Nothing counted
is lost: `log_summary()` (at the end of a run) names the kinds whose refusals were not all
logged, with their counts. What a refusal message quotes of the client's input is already
escaped (`repr`) by the check that raised it. The table of kinds is capped, so a peer that
rotates its address cannot grow it without bound either. A client's withdrawal is no refusal,
but its line is held to the same limits (`withdrew`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fedgrpc.server.refusals")

WINDOW_S = 60.0
MAX_KINDS = 4096
#: Lines one address may get in the log within WINDOW_S, all its kinds together.
LINES_PER_ADDRESS = 20
#: Kinds named one by one in the summary.
SUMMARY_KINDS = 10

#: Told of every refusal, rate limit or not: (address, code, what, message, client id if known).
Listener = Callable[[str, str, str, str, "int | None"], None]
_Kind = tuple[str, "int | None", str]  # address, client id, code
#: The kind of a withdrawal's line (no gRPC status is named so).
WITHDRAWAL = "withdrawal"


class RefusalLog:
    def __init__(self, window_s: float = WINDOW_S, listener: Listener | None = None) -> None:
        self._window_s = window_s
        self._kinds: dict[_Kind, tuple[float, int]] = {}  # kind -> (last logged, suppressed since)
        self._lines: dict[str, tuple[float, int]] = {}  # address -> (window start, lines in it)
        self._unlogged: dict[_Kind, int] = {}  # kind -> refusals never logged line by line
        self._lock = threading.Lock()
        self._listener = listener
        self.total = 0
        self.suppressed = 0

    def refused(self, address: str, code: str, what: str, message: str, client_id: int | None = None) -> None:
        if self._listener is not None:
            self._listener(address, code, what, message, client_id)
        key = (address, client_id, code)
        with self._lock:
            self.total += 1
            suppressed = self._admit(key, address)
            if suppressed is None:
                self.suppressed += 1
                if len(self._unlogged) < MAX_KINDS or key in self._unlogged:
                    self._unlogged[key] = self._unlogged.get(key, 0) + 1
                return
            self._unlogged.pop(key, None)  # the line below counts them
        client = f" (client {client_id})" if client_id is not None else ""
        more = f" (and {suppressed} more {code} from there in the last minute)" if suppressed else ""
        log.warning("refused %s from %s%s: %s %s%s", what, address, client, code, message, more)

    def withdrew(self, address: str, client_id: int, reason: str) -> None:
        """A client said it cannot take part. Not a refusal, but logged under the same limits
        (one line per address and client a minute, within the address's share of lines), so
        that a client alternating reasons, or withdrawing between polls, cannot flood the log."""
        with self._lock:
            suppressed = self._admit((address, client_id, WITHDRAWAL), address)
        if suppressed is None:
            return
        more = f" (and {suppressed} more withdrawals from there in the last minute)" if suppressed else ""
        log.warning(
            "client %d cannot take part: %s. The run goes on without it if --min-clients allows%s",
            client_id, reason, more,
        )  # fmt: skip

    def log_summary(self) -> None:
        """One line for the refusals that were counted but not logged since their kind's last line."""
        with self._lock:
            unlogged = sorted(self._unlogged.items(), key=lambda item: -item[1])
            total, suppressed = self.total, sum(self._unlogged.values())
        if not unlogged:
            return
        named = ", ".join(
            f"{count} {code} from {address}" + (f" (client {client})" if client is not None else "")
            for (address, client, code), count in unlogged[:SUMMARY_KINDS]
        )
        others = f", and {len(unlogged) - SUMMARY_KINDS} more kinds" if len(unlogged) > SUMMARY_KINDS else ""
        log.warning("refusals: %d in all; %d not logged one by one: %s%s", total, suppressed, named, others)

    def _admit(self, key: _Kind, address: str) -> int | None:
        """Lock held: None when this kind's line is held back (counted instead); otherwise how
        many of its kind were held back since its last line."""
        now = time.monotonic()
        last, suppressed = self._kinds.get(key, (-self._window_s, 0))
        if now - last < self._window_s or not self._line_allowed(address, now):
            self._kinds[key] = (last, suppressed + 1)
            return None
        if len(self._kinds) >= MAX_KINDS:
            self._kinds.clear()
            self._lines.clear()
        self._kinds[key] = (now, 0)
        return suppressed

    def _line_allowed(self, address: str, now: float) -> bool:
        start, lines = self._lines.get(address, (now, 0))
        if now - start >= self._window_s:
            start, lines = now, 0
        if lines >= LINES_PER_ADDRESS:
            return False
        self._lines[address] = (start, lines + 1)
        return True
