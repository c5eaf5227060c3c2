"""A light client's link to the coordinator on grpc.aio: Connection's calls as coroutines.

The async twin of fedgrpc.client.connection (the other module of fedgrpc.client that touches
*_pb2 types): the same requests and readings of the server's answers, which it takes from
there, and the same retry policy and channel (fedgrpc.client.channel), rather than copies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc

from ..common import secagg as sa
from ..common import wire
from ..common.codec import DEFAULT_CHUNK_BYTES, TensorAssembler, TensorSpec
from ..common.config import RunSpec
from ..common.errors import StaleRoundError, TaskMismatchError
from ..common.protocol import READY_FOR_CHUNKS_KEY, Assignment, Instruction
from .channel import Backoff, ChannelSecurity, Retries
from .connection import (
    Traffic,
    advertise_request,
    assignment_from_header,
    evaluation_report,
    join_request,
    message_size,
    poll_request,
    reveal_request,
    share_request,
    stage_from_reply,
    stage_request,
    update_streams,
)

T = TypeVar("T")


class AioConnection:
    """One client's channel to the server on grpc.aio: the calls of Connection that a client
    without task code makes (Join, the long-poll, SubmitUpdate, SubmitEvaluation, secure
    aggregation's steps), as coroutines.

    Many of these share one event loop (and, if given, one channel), so thousands of simulated
    clients cost a coroutine each, not a thread each. The same requests, pacing, retries and
    errors as Connection."""

    def __init__(
        self,
        target: str,
        client_id: int,
        *,
        connect_timeout_s: float = 60.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        backoff: Backoff | None = None,
        security: ChannelSecurity | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """`channel`: one to share with the other AioConnections of this loop; not closed here."""
        self.target = target
        self.client_id = client_id
        self.connect_timeout_s = connect_timeout_s
        self.chunk_bytes = chunk_bytes
        security = security or ChannelSecurity()
        self._metadata = security.metadata()
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else security.aio_channel(target)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self.traffic = Traffic()
        self.retries = Retries(target, connect_timeout_s, backoff or Backoff())
        self._submit_update = self._channel.stream_unary(
            f"/{wire.SERVICE}/SubmitUpdate",
            request_serializer=wire.serialize,
            response_deserializer=pb.SubmitUpdateReply.FromString,
        )

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> AioConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def join(self) -> tuple[RunSpec, int]:
        """The run's spec and its current round (as Connection.join for a client with no task)."""
        try:
            reply = await self._unary("join", self._stub.Join, join_request(self.client_id, None), timeout=10)
        except StaleRoundError as exc:
            raise TaskMismatchError(str(exc)) from None
        return wire.run_from_pb(reply.run), reply.current_round

    async def submit_evaluation(
        self, round_number: int, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]:
        request = evaluation_report(self.client_id, round_number, num_examples, metrics)
        reply = await self._unary("report", self._stub.SubmitEvaluation, request)
        return reply.received, reply.expected

    async def next_task(self, after_round: int, max_wait_s: float = 30.0) -> Assignment:
        """Long-poll for what to do after `after_round`; the weights come with TRAIN and EVALUATE."""
        request = poll_request(self.client_id, after_round, max_wait_s)
        self.traffic.sent += request.ByteSize()

        async def call() -> Assignment:
            stream = self._stub.GetGlobalWeights(request, timeout=max_wait_s + 30, metadata=self._metadata)
            try:
                return await self._receive(stream)
            finally:
                stream.cancel()  # a no-op once the stream has ended; ends it if we stopped reading

        return await self._retrying("fetch", call)

    async def pause(self, seconds: float) -> None:
        """Hold no call for `seconds` (a WAIT's retry-after): a sleeping coroutine, no thread."""
        await asyncio.sleep(seconds)

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
        """Send trained weights (as Connection.submit): the header at once, the chunks once the
        server says it has room for them; returns (updates received, updates expected)."""
        streams = update_streams(
            self.client_id, round_number, specs, weights, num_examples, metrics,
            reference=reference, method=method, session=session, chunk_bytes=self.chunk_bytes,
        )  # fmt: skip
        reply = await self._retrying("submit", lambda: self._stream_update(streams()))
        return reply.received, reply.expected

    async def _stream_update(self, stream: Iterator[pb.UpdateMessage | bytes]) -> pb.SubmitUpdateReply:
        update = self._submit_update(None, timeout=300, metadata=self._metadata)
        try:
            header = next(stream)
            self.traffic.sent += message_size(header)
            await update.write(header)
            # The chunks only once the server says it has room for them. Without that word the
            # server is ending the call, and a write now would hide its status behind grpc.aio's
            # INTERNAL "Internal error from Core".
            ready = await update.initial_metadata()  # also returns if the call already ended
            if any(key == READY_FOR_CHUNKS_KEY for key, _ in ready or ()):
                for message in stream:
                    self.traffic.sent += message_size(message)
                    await update.write(message)
                await update.done_writing()
        except asyncio.InvalidStateError:  # the server ended the call early: its status says why
            pass
        reply: pb.SubmitUpdateReply = await update
        self.traffic.received += reply.ByteSize()
        return reply

    # -- secure aggregation's steps (fedgrpc.client.secagg drives them) ------------------------

    async def advertise_keys(
        self, round_number: int, cipher_key: bytes, mask_key: bytes, commitment: bytes
    ) -> None:
        request = advertise_request(self.client_id, round_number, cipher_key, mask_key, commitment)
        await self._unary("advertise keys", self._stub.AdvertiseKeys, request)

    async def secagg_stage(self, round_number: int, step: sa.Step, max_wait_s: float = 30.0) -> sa.Stage:
        """Long-poll until `step` ("share", "mask" or "unmask") may start."""
        request = stage_request(self.client_id, round_number, step, max_wait_s)
        stub = self._stub.GetSecAggStage
        return stage_from_reply(await self._unary("secure aggregation stage", stub, request, max_wait_s + 30))

    async def share_keys(self, round_number: int, ciphertexts: Mapping[int, bytes], session: bytes) -> None:
        request = share_request(self.client_id, round_number, ciphertexts, session)
        await self._unary("share keys", self._stub.ShareKeys, request)

    async def reveal_shares(
        self, round_number: int, shares: Sequence[tuple[int, sa.ShareKind, sa.Share]], session: bytes
    ) -> None:
        request = reveal_request(self.client_id, round_number, shares, session)
        await self._unary("reveal shares", self._stub.RevealShares, request)

    async def _unary(self, what: str, method: Callable[..., Any], request: Any, timeout: float = 30) -> Any:
        reply = await self._retrying(what, lambda: method(request, timeout=timeout, metadata=self._metadata))
        self.traffic.sent += request.ByteSize()
        self.traffic.received += reply.ByteSize()
        return reply

    async def _receive(self, stream: Any) -> Assignment:
        first = await stream.read()
        if not isinstance(first, pb.WeightsMessage):  # grpc.aio.EOF: the stream ended
            first = None
        self.traffic.received += first.ByteSize() if first is not None else 0
        assignment = assignment_from_header(first)
        if assignment.instruction not in (Instruction.TRAIN, Instruction.EVALUATE):
            await stream.read()  # the stream's end: the call ends as it should, not cancelled
            return assignment
        assembler = TensorAssembler(assignment.all_specs)
        wire_bytes = 0
        while isinstance(message := await stream.read(), pb.WeightsMessage):
            self.traffic.received += message.ByteSize()
            chunk = message.chunk
            assembler.add(chunk.tensor_index, chunk.offset, chunk.data)
            wire_bytes += len(chunk.data)
        return assignment.with_arrays(assembler.finish(), wire_bytes)

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, tried again as self.retries says (Connection's policy), waiting with asyncio.sleep."""
        tries = self.retries.begin()
        while True:
            try:
                result = await call()
            except grpc.RpcError as exc:
                await asyncio.sleep(self.retries.failed(what, tries, exc))
            else:
                self.retries.succeeded(what, tries)
                return result
