"""Long-polls: a call held until what it asks for is there, or its time is up.

    look --found--> answer it
    look --nothing, time left--> wait for the next phase change or the end of the wait --> look
    look --nothing, time up--> answer None (the caller says WAIT)

The round's phase changes on the driver's thread; RoundCoordinator.on_phase_change brings each
one to the event loop (`phase_changed`), which wakes every waiting call at once through one
shared future. A call takes that future before it looks, so a change between its look and its
wait still wakes it. Its wait is shielded from the shared future: a call that times out or is
cancelled (its client gone) ends only its own wait. A wait is bounded by the server's cap, the
client's wish (max_wait_ms) and the client's deadline, less a margin to answer in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress
from typing import TypeVar

from .auth import CallContext

T = TypeVar("T")
#: Answer this long before the client's deadline, so that the answer still reaches it.
DEADLINE_MARGIN_S = 0.5


def time_left(context: CallContext) -> float:
    """Seconds until the call's deadline less the margin; infinite with no deadline."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e9:  # no deadline (some versions report a huge one)
        return float("inf")
    return float(remaining) - DEADLINE_MARGIN_S


class LongPolls:
    """The waiting calls of one server; used on its event loop only."""

    def __init__(self, max_wait_s: float) -> None:
        self._max_wait_s = max_wait_s
        self._phase_future: asyncio.Future[None] | None = None

    def phase_changed(self) -> None:
        """Wake every waiting call (they look again)."""
        future, self._phase_future = self._phase_future, None
        if future is not None and not future.done():
            future.set_result(None)

    def bound(self, max_wait_ms: int, context: CallContext) -> float:
        """How long a call may be held: the server's cap, the client's wish, its deadline."""
        wait = self._max_wait_s
        if max_wait_ms:
            wait = min(wait, max_wait_ms / 1000)
        return max(0.0, min(wait, time_left(context)))

    async def until(self, look: Callable[[], T | None], max_wait_ms: int, context: CallContext) -> T | None:
        """What `look` finds, looking again at each phase change; None once the bound is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bound(max_wait_ms, context)
        while True:
            if self._phase_future is None:  # taken before looking: a change after the look resolves it
                self._phase_future = loop.create_future()
            changed = self._phase_future
            found = look()
            remaining = deadline - loop.time()
            if found is not None or remaining <= 0:
                return found
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(changed), remaining)
