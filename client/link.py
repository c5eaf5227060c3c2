"""The calls a client session makes, as coroutines, whichever connection makes them.

A Session (fedgrpc.client.session) and its exchange's steps (fedgrpc.client.steps) are written
once, as coroutines over a Link. Two connections are Links:

- AioConnection (grpc.aio) is one as it is: light clients run thousands of sessions on one
  event loop, each a coroutine, none a thread.
- a blocking Connection is one through BlockingLink, whose coroutines make the blocking call
  and return: they never suspend. `run_blocking` runs such a coroutine to its end on the
  calling thread, without an event loop (fl-client, the script API, fl-sim's actors, where a
  client is a thread or a process of its own and thousands of threads must not each open an
  event loop's selector and pipe).

A coroutine run by run_blocking that does suspend (it awaited something that needs a loop, such
as asyncio.sleep) is a bug, and run_blocking says so instead of hanging.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from ..common import secagg as sa
from ..common.codec import TensorSpec
from ..common.protocol import Assignment
from .connection import Connection

T = TypeVar("T")


class Link(Protocol):
    """What a session calls: Connection's calls, as coroutines (AioConnection, BlockingLink)."""

    @property
    def client_id(self) -> int: ...

    async def next_task(self, after_round: int, max_wait_s: float = 30.0) -> Assignment: ...

    async def pause(self, seconds: float) -> None:
        """Hold no call for `seconds` (a WAIT's retry-after)."""
        ...

    async def submit(
        self,
        round_number: int,
        specs: Sequence[TensorSpec],
        weights: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float],
        *,
        reference: Sequence[np.ndarray] = (),
        method: str = "none",
        session: bytes = b"",
    ) -> tuple[int, int]: ...

    async def submit_evaluation(
        self, round_number: int, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]: ...

    async def advertise_keys(
        self, round_number: int, cipher_key: bytes, mask_key: bytes, commitment: bytes
    ) -> None: ...

    async def secagg_stage(self, round_number: int, step: sa.Step, max_wait_s: float = 30.0) -> sa.Stage: ...

    async def share_keys(
        self, round_number: int, ciphertexts: Mapping[int, bytes], session: bytes
    ) -> None: ...

    async def reveal_shares(
        self, round_number: int, shares: Sequence[tuple[int, sa.ShareKind, sa.Share]], session: bytes
    ) -> None: ...


class BlockingLink:
    """A blocking Connection as a Link: each coroutine makes the call and returns, never
    suspending (run them with run_blocking). The connection's methods are looked up at each
    call, so a caller that wraps one of them on the connection sees this link use the wrapper."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    @property
    def client_id(self) -> int:
        return self.connection.client_id

    async def next_task(self, after_round: int, max_wait_s: float = 30.0) -> Assignment:
        return self.connection.next_task(after_round, max_wait_s)

    async def pause(self, seconds: float) -> None:
        time.sleep(seconds)  # this thread is the client's own: sleeping it suspends nothing else

    async def submit(
        self,
        round_number: int,
        specs: Sequence[TensorSpec],
        weights: Sequence[np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float],
        *,
        reference: Sequence[np.ndarray] = (),
        method: str = "none",
        session: bytes = b"",
    ) -> tuple[int, int]:
        return self.connection.submit(
            round_number, specs, weights, num_examples, metrics,
            reference=reference, method=method, session=session,
        )  # fmt: skip

    async def submit_evaluation(
        self, round_number: int, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]:
        return self.connection.submit_evaluation(round_number, num_examples, metrics)

    async def advertise_keys(
        self, round_number: int, cipher_key: bytes, mask_key: bytes, commitment: bytes
    ) -> None:
        self.connection.advertise_keys(round_number, cipher_key, mask_key, commitment)

    async def secagg_stage(self, round_number: int, step: sa.Step, max_wait_s: float = 30.0) -> sa.Stage:
        return self.connection.secagg_stage(round_number, step, max_wait_s)

    async def share_keys(self, round_number: int, ciphertexts: Mapping[int, bytes], session: bytes) -> None:
        self.connection.share_keys(round_number, ciphertexts, session)

    async def reveal_shares(
        self, round_number: int, shares: Sequence[tuple[int, sa.ShareKind, sa.Share]], session: bytes
    ) -> None:
        self.connection.reveal_shares(round_number, shares, session)


def run_blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its awaits all end in BlockingLink's calls) to its
    end on this thread, without an event loop; its exceptions propagate as they are."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("a blocking client session suspended: it awaited something that needs an event loop")
