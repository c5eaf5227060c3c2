"""What one peer may hold of the server, and for how long.

A coordinator serves every client from one event loop, so a call that waits costs a little
memory, not a thread. What is left to bound is how many calls anyone may hold open and how
long a call may sit silent:

| limit                      | refusal                      | why                                          |
|----------------------------|------------------------------|----------------------------------------------|
| `max_calls`, all peers     | RESOURCE_EXHAUSTED (gRPC's)  | memory of open calls (room for every client) |
| `max_calls_per_peer`       | RESOURCE_EXHAUSTED           | one network address cannot take them all     |
| `max_calls_per_client`     | RESOURCE_EXHAUSTED           | one client id (proven by its token or        |
|                            |                              | certificate) holds at most this many of each |
|                            |                              | kind: long-polls, update streams             |
| `stall_timeout_s`          | DEADLINE_EXCEEDED, call cut  | a stream that sends nothing (no header, or   |
|                            |                              | no next chunk) releases what it holds        |
| `inflight_wait_s`          | UNAVAILABLE                  | an update that never fits the in-flight      |
|                            |                              | budget is told to come back later            |
| `max_wait_s`               | (answers WAIT)               | a long-poll's longest hold                   |
| `checkin_rate`             | (WAIT with a retry-after)    | clients not needed now come back at about    |
|                            |                              | this many a second (fedgrpc.server.pacing)   |

Every wait is bounded by these whether or not the client set a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from ..common.errors import ConfigError, OverloadError, StalledError

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    stall_timeout_s: float = 20.0  # longest silence inside a stream: before the header, between chunks
    max_calls: int | None = None  # calls open at once, all peers together; None: see `total`
    max_calls_per_peer: int | None = None  # per network address; None: 4 per client of the run + 64
    max_calls_per_client: int = 2  # per client id and kind (long-polls, update streams)
    inflight_wait_s: float = 120.0  # longest wait for room in the in-flight budget
    max_wait_s: float = 30.0  # longest hold of a long-poll before it answers WAIT
    checkin_rate: float = 1000.0  # check-ins a second of the clients told to come back later

    def __post_init__(self) -> None:
        for name in ("stall_timeout_s", "inflight_wait_s", "max_wait_s", "checkin_rate"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_calls_per_client < 1:
            raise ConfigError(f"max_calls_per_client must be at least 1, got {self.max_calls_per_client}")
        for name in ("max_calls", "max_calls_per_peer"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")

    def total(self, num_clients: int) -> int:
        """Calls all peers together may hold: by default 8192, or room for every client of the
        run to wait in a long-poll while submitting and asking for its secure-aggregation stage
        (4 each, + 64), whichever is more; an open call costs a few kilobytes."""
        if self.max_calls is not None:
            return self.max_calls
        return max(8192, 4 * num_clients + 64)

    def per_peer(self, num_clients: int) -> int:
        """Calls one address may hold: by default room for every client of the run behind one
        address (a site behind NAT, or fl-local on one machine), and no more."""
        if self.max_calls_per_peer is not None:
            return self.max_calls_per_peer
        return 4 * num_clients + 64


class CallCounter:
    """Open calls per key, refused past a limit. Used from the event loop thread only."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self._what = what
        self._open: dict[object, int] = {}
        self.total = 0
        self.peak = 0  # the most open at once since `reset_peak`

    @contextmanager
    def hold(self, key: object) -> Iterator[None]:
        count = self._open.get(key, 0)
        if count >= self.limit:
            raise OverloadError(
                f"{self._what} {key} already has {count} calls of this kind open, the most this "
                "server allows; wait for them to end"
            )
        self._open[key] = count + 1
        self.total += 1
        self.peak = max(self.peak, self.total)
        try:
            yield
        finally:
            self.total -= 1
            left = self._open[key] - 1
            if left:
                self._open[key] = left
            else:
                del self._open[key]

    def reset_peak(self) -> None:
        self.peak = self.total


async def next_message(messages: AsyncIterator[T], timeout: float, what: str) -> T | None:
    """The stream's next message, None at its end; StalledError after `timeout` seconds of silence."""
    try:
        return await asyncio.wait_for(anext(messages), timeout)
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        raise StalledError(
            f"nothing arrived for {timeout:.0f} s while waiting for {what}; the stream was cut"
        ) from None
