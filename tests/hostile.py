"""A hostile peer for the tests: raw grpc.aio calls that try to hold a server's resources.

Runs its own event loop on a thread, so a test can keep thousands of calls open while real
fl-server and fl-client processes go on. Every call it makes ends with a status code, which
it counts by name ("OK" for a call that succeeded).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any

import grpc
from fedgrpc.common import wire
from fedgrpc.common.codec import TensorSpec
from fedgrpc.v1 import coordinator_pb2 as pb

SUBMIT = f"/{wire.SERVICE}/SubmitUpdate"
FETCH = f"/{wire.SERVICE}/GetGlobalWeights"


class Attacker:
    def __init__(self, target: str, token: str | None = None) -> None:
        self.target = target
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.outcomes: Counter[str] = Counter()
        self.details: Counter[str] = Counter()
        self.open = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._stop: asyncio.Event = self._run(self._make_event())
        self._channel: grpc.aio.Channel = self._run(self._make_channel())
        self._tasks: list[asyncio.Task[None]] = []

    # -- what it does ----------------------------------------------------------------

    def idle_submits(self, count: int) -> None:
        """SubmitUpdate streams that never send a message."""
        self._spawn(count, lambda: self._submit(()))

    def stalled_submits(
        self, count: int, client_id: int, round_number: int, specs: Sequence[TensorSpec], n: int = 10
    ) -> None:
        """SubmitUpdate streams with a valid header and one chunk of the first tensor, then silence."""
        header = pb.UpdateMessage(
            header=pb.UpdateHeader(
                client_id=client_id,
                round=round_number,
                num_examples=n,
                tensors=[wire.spec_to_pb(s) for s in specs],
            )
        )
        chunk = pb.UpdateMessage(
            chunk=pb.TensorChunk(tensor_index=0, offset=0, data=b"\0" * min(64, specs[0].nbytes))
        )
        self._spawn(count, lambda: self._submit((header, chunk)))

    def long_polls(self, count: int, client_id: int, after_round: int = 0) -> None:
        """GetGlobalWeights calls (read to the end, whatever comes)."""
        request = pb.GetGlobalWeightsRequest(client_id=client_id, after_round=after_round)
        self._spawn(count, lambda: self._fetch(request))

    def close(self) -> None:
        """End every call still open (the peer goes away), then the loop."""
        self._run(self._cancel_all())
        self._run(self._channel.close(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def settled(self, expected: int, timeout: float) -> bool:
        """Wait until `expected` calls have ended."""
        deadline = self._loop.time() + timeout
        while sum(self.outcomes.values()) < expected and self._loop.time() < deadline:
            threading.Event().wait(0.05)
        return sum(self.outcomes.values()) >= expected

    # -- internals -----------------------------------------------------------------

    async def _make_event(self) -> asyncio.Event:
        return asyncio.Event()

    async def _make_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])

    def _spawn(self, count: int, make: Any) -> None:
        async def spawn() -> None:
            for _ in range(count):
                self._tasks.append(asyncio.ensure_future(self._counted(make())))

        self._run(spawn())

    async def _counted(self, call: Coroutine[Any, Any, None]) -> None:
        self.open += 1
        try:
            await call
            self.outcomes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            self.outcomes[exc.code().name] += 1
            self.details[exc.details() or ""] += 1
        except asyncio.CancelledError:
            self.outcomes["closed by us"] += 1
        finally:
            self.open -= 1

    async def _submit(self, messages: Sequence[pb.UpdateMessage]) -> None:
        async def requests() -> AsyncIterator[bytes]:
            for message in messages:
                yield message.SerializeToString()
            await self._stop.wait()  # and then nothing, ever

        call = self._channel.stream_unary(SUBMIT, None, None)(requests(), metadata=self.metadata)
        await call

    async def _fetch(self, request: pb.GetGlobalWeightsRequest) -> None:
        call = self._channel.unary_stream(FETCH, None, None)(
            request.SerializeToString(), metadata=self.metadata
        )
        async for _ in call:
            pass

    async def _cancel_all(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)
