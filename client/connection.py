"""The client's link to the coordinator: the calls it makes, blocking, with retries.

Connection makes them blocking (fl-client, the script API, fl-sim's actors); AioConnection
(fedgrpc.client.aio_connection) makes the same calls on grpc.aio, so one event loop can run
thousands of light clients. Both build their requests and read the server's answers with this
module's functions, and take their retry policy and channel from fedgrpc.client.channel, one
copy for both. These two are the only modules of fedgrpc.client that touch generated *_pb2
types; the status codes a call fails with become fedgrpc errors as fedgrpc.client.channel's
table says.

Every submit of the client (Connection.submit, AioConnection.submit, SecureRound.submit) takes
the same arguments in the same order: round_number, specs, weights, num_examples, metrics, then
`reference`, the global weights the round's training started from, by name.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc

from ..common import compression, wire
from ..common import secagg as sa
from ..common.codec import DEFAULT_CHUNK_BYTES, TensorSpec
from ..common.config import RunSpec, TaskRef
from ..common.errors import StaleRoundError, TaskMismatchError, UpdateRejectedError
from ..common.metrics import check_metrics
from ..common.protocol import Assignment, Instruction
from .channel import Backoff, ChannelSecurity, Retries, error_from

__all__ = ["Backoff", "ChannelSecurity", "Connection", "Traffic", "assignment_from_header"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Traffic:
    """Protobuf bytes this connection sent and received (gRPC's own framing not counted)."""

    sent: int = 0
    received: int = 0


_INSTRUCTIONS = {
    pb.TRAIN: Instruction.TRAIN,
    pb.WAIT: Instruction.WAIT,
    pb.FINISHED: Instruction.FINISHED,
    pb.EVALUATE: Instruction.EVALUATE,
}


def assignment_from_header(first: pb.WeightsMessage | None) -> Assignment:
    """The assignment that a weights stream's first message announces, without its weights.

    A stream that does not start with a header, or an instruction this client does not know (a
    newer server's), is an error: taken for WAIT, it would have the client poll for ever."""
    if first is None or first.WhichOneof("part") != "header":
        raise UpdateRejectedError("the server's weights stream did not start with a header", code="INTERNAL")
    header = first.header
    instruction = _INSTRUCTIONS.get(header.instruction)
    if instruction is None:
        raise UpdateRejectedError(
            f"the server sent instruction {header.instruction}, which this client does not know: "
            "run an fl-client as new as the server",
            code="INTERNAL",
        )
    specs = tuple(wire.spec_from_pb(t) for t in header.tensors)
    retry_after_s = header.retry_after_ms / 1000 if instruction is Instruction.WAIT else 0.0
    return Assignment(
        instruction, header.round, specs, run_id=header.run_id,
        settings=wire.settings_from_pb(header.settings),
        extra_specs=tuple(wire.spec_from_pb(t) for t in header.extra_tensors),
        retry_after_s=retry_after_s,
    )  # fmt: skip


# -- requests and answers, for both connections ---------------------------------------------------


def update_streams(
    client_id: int,
    round_number: int,
    specs: Sequence[TensorSpec],
    weights: Sequence[np.ndarray],
    num_examples: int,
    metrics: Mapping[str, float],
    *,
    reference: Sequence[np.ndarray],
    method: str,
    session: bytes,
    chunk_bytes: int,
) -> Callable[[], Iterator[pb.UpdateMessage | bytes]]:
    """SubmitUpdate's messages, a fresh stream for each try: the header, then the chunks of the
    update, compressed once. Metrics the server would refuse fail here, before anything is sent."""
    metrics = check_metrics(metrics)
    arrays, scales = compression.encode(specs, weights, reference, method)
    return lambda: wire.update_stream(
        client_id=client_id,
        round_number=round_number,
        num_examples=num_examples,
        metrics=metrics,
        specs=specs,
        arrays=arrays,
        chunk_bytes=chunk_bytes,
        compression=method,
        scales=scales,
        session=session,
    )


def join_request(client_id: int, task: TaskRef | None, *, spec_only: bool = False) -> pb.JoinRequest:
    return pb.JoinRequest(client_id=client_id, task=wire.task_to_pb(task), spec_only=spec_only)


def poll_request(client_id: int, after_round: int, max_wait_s: float) -> pb.GetGlobalWeightsRequest:
    """A long-poll of a client that honours WAIT's retry-after (fedgrpc.client.session pauses)."""
    return pb.GetGlobalWeightsRequest(
        client_id=client_id,
        after_round=after_round,
        max_wait_ms=int(max_wait_s * 1000),
        accepts_retry_after=True,
    )


def evaluation_report(
    client_id: int, round_number: int, num_examples: int, metrics: Mapping[str, float]
) -> pb.EvaluationReport:
    return pb.EvaluationReport(
        client_id=client_id, round=round_number, num_examples=num_examples, metrics=check_metrics(metrics)
    )


def advertise_request(
    client_id: int, round_number: int, cipher_key: bytes, mask_key: bytes, commitment: bytes
) -> pb.AdvertiseKeysRequest:
    return pb.AdvertiseKeysRequest(
        client_id=client_id,
        round=round_number,
        cipher_public_key=cipher_key,
        mask_public_key=mask_key,
        commitment=commitment,
    )


def stage_request(
    client_id: int, round_number: int, step: sa.Step, max_wait_s: float
) -> pb.SecAggStageRequest:
    """GetSecAggStage's request: wait until `step` may start."""
    return pb.SecAggStageRequest(
        client_id=client_id,
        round=round_number,
        step=wire.step_to_pb(step),
        max_wait_ms=int(max_wait_s * 1000),
    )


def stage_from_reply(reply: pb.SecAggStage) -> sa.Stage:
    return wire.stage_from_pb(reply)


def share_request(
    client_id: int, round_number: int, ciphertexts: Mapping[int, bytes], session: bytes
) -> pb.ShareKeysRequest:
    return pb.ShareKeysRequest(
        client_id=client_id,
        round=round_number,
        session=session,
        shares=[pb.EncryptedShares(client_id=v, ciphertext=c) for v, c in ciphertexts.items()],
    )


def reveal_request(
    client_id: int, round_number: int, shares: Sequence[tuple[int, sa.ShareKind, sa.Share]], session: bytes
) -> pb.RevealSharesRequest:
    return pb.RevealSharesRequest(
        client_id=client_id,
        round=round_number,
        session=session,
        shares=[
            pb.RevealedShare(
                owner=owner, kind=wire.share_kind_to_pb(kind), index=share.index, value=share.value
            )
            for owner, kind, share in shares
        ],
    )


def message_size(message: pb.UpdateMessage | bytes) -> int:
    return len(message) if isinstance(message, bytes) else message.ByteSize()


# -- the blocking connection -----------------------------------------------------------------------


class Connection:
    """One client's channel to the server, its calls blocking."""

    def __init__(
        self,
        target: str,
        client_id: int,
        *,
        connect_timeout_s: float = 60.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        backoff: Backoff | None = None,
        security: ChannelSecurity | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        """`channel`: one to share with other Connections of this process (many simulated
        clients: one channel, one polling thread, instead of one each); it is not closed here."""
        self.target = target
        self.client_id = client_id
        self.connect_timeout_s = connect_timeout_s
        self.chunk_bytes = chunk_bytes
        self.backoff = backoff = backoff or Backoff()
        security = security or ChannelSecurity()
        self._metadata = security.metadata()
        self._owns_channel = channel is None
        self._channel = channel if channel is not None else security.channel(target)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self.traffic = Traffic()
        self.retries = Retries(target, connect_timeout_s, backoff)
        # SubmitUpdate with wire.serialize, so chunks go out as encode_chunk wrote them (one copy).
        self._submit_update = self._channel.stream_unary(
            f"/{wire.SERVICE}/SubmitUpdate",
            request_serializer=wire.serialize,
            response_deserializer=pb.SubmitUpdateReply.FromString,
        )

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def join(self, task: TaskRef | None = None, *, spec_only: bool = False) -> tuple[RunSpec, int]:
        """The run's spec and its current round; retries while the server is not up yet.

        `task`: the task this client runs, which the server compares with the run's (None: a
        client that runs no task code). `spec_only`: read the spec without joining."""
        request = join_request(self.client_id, task, spec_only=spec_only)
        try:
            reply = self._unary("join", self._stub.Join, request, timeout=10)
        except StaleRoundError as exc:  # FAILED_PRECONDITION, which Join only answers for this
            raise TaskMismatchError(str(exc)) from None
        return wire.run_from_pb(reply.run), reply.current_round

    def submit_evaluation(
        self, round_number: int, num_examples: int, metrics: Mapping[str, float]
    ) -> tuple[int, int]:
        """Report the global model's metrics on this client's held-out data (num_examples 0: it has
        none); returns (reports the server holds for the round, reports it expects)."""
        request = evaluation_report(self.client_id, round_number, num_examples, metrics)
        reply = self._unary("report", self._stub.SubmitEvaluation, request)
        return reply.received, reply.expected

    def withdraw(self, reason: str) -> bool:
        """Tell the server that this client cannot take part, and why, so that it does not wait
        for it. One try: the client stops either way. False when the server did not hear it (one
        older than the Withdraw call answers UNIMPLEMENTED)."""
        text = "".join(c if c.isprintable() else " " for c in " ".join(reason.split()))
        request = pb.WithdrawRequest(
            client_id=self.client_id, reason=text[: wire.MAX_REASON] or "no reason given"
        )
        try:
            self._stub.Withdraw(request, timeout=10, metadata=self._metadata)
        except grpc.RpcError as exc:
            log.debug("the server did not take this client's withdrawal: %s", error_from(exc))
            return False
        return True

    def next_task(self, after_round: int, max_wait_s: float = 30.0) -> Assignment:
        """Long-poll for what to do after `after_round`; the weights come with TRAIN and EVALUATE."""
        request = poll_request(self.client_id, after_round, max_wait_s)
        self.traffic.sent += request.ByteSize()
        return self._retrying(
            "fetch",
            lambda: self._receive(
                self._stub.GetGlobalWeights(request, timeout=max_wait_s + 30, metadata=self._metadata)
            ),
        )

    def submit(
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
        """Send trained weights; returns (updates the round has received, updates it expects).

        With a `method` other than "none" the update travels compressed relative to `reference`,
        the global weights the round's training started from; `session`: the secure
        aggregation attempt a masked update (method "secagg") belongs to."""
        streams = update_streams(
            self.client_id, round_number, specs, weights, num_examples, metrics,
            reference=reference, method=method, session=session, chunk_bytes=self.chunk_bytes,
        )  # fmt: skip
        reply = self._retrying("submit", lambda: self._stream_update(streams()))
        return reply.received, reply.expected

    def _stream_update(self, stream: Iterator[pb.UpdateMessage | bytes]) -> pb.SubmitUpdateReply:
        started = threading.Event()
        calls: list[Any] = []  # the call: a grpc.Future that is also a grpc.Call

        def paced() -> Iterator[pb.UpdateMessage | bytes]:
            # The header goes at once; the chunks only when the server says it is ready for
            # them (its initial metadata), so an update waiting for the server's in-flight
            # budget waits here, not in the server's memory.
            header = next(stream)
            self.traffic.sent += message_size(header)
            yield header
            started.wait()
            calls[0].initial_metadata()  # returns early too if the call already ended
            for message in stream:
                self.traffic.sent += message_size(message)
                yield message

        future = self._submit_update.future(paced(), timeout=300, metadata=self._metadata)
        calls.append(future)
        started.set()
        reply: pb.SubmitUpdateReply = future.result()
        self.traffic.received += reply.ByteSize()
        return reply

    # -- secure aggregation's steps (fedgrpc.client.secagg drives them) ------------------------

    def advertise_keys(
        self, round_number: int, cipher_key: bytes, mask_key: bytes, commitment: bytes
    ) -> None:
        request = advertise_request(self.client_id, round_number, cipher_key, mask_key, commitment)
        self._unary("advertise keys", self._stub.AdvertiseKeys, request)

    def secagg_stage(self, round_number: int, step: sa.Step, max_wait_s: float = 30.0) -> sa.Stage:
        """Long-poll until `step` ("share", "mask" or "unmask") may start."""
        request = stage_request(self.client_id, round_number, step, max_wait_s)
        reply = self._unary("secure aggregation stage", self._stub.GetSecAggStage, request, max_wait_s + 30)
        return stage_from_reply(reply)

    def share_keys(self, round_number: int, ciphertexts: Mapping[int, bytes], session: bytes) -> None:
        request = share_request(self.client_id, round_number, ciphertexts, session)
        self._unary("share keys", self._stub.ShareKeys, request)

    def reveal_shares(
        self, round_number: int, shares: Sequence[tuple[int, sa.ShareKind, sa.Share]], session: bytes
    ) -> None:
        request = reveal_request(self.client_id, round_number, shares, session)
        self._unary("reveal shares", self._stub.RevealShares, request)

    def _unary(self, what: str, method: Callable[..., Any], request: Any, timeout: float = 30) -> Any:
        """One unary call, retried (see _retrying), its bytes counted."""
        reply = self._retrying(what, lambda: method(request, timeout=timeout, metadata=self._metadata))
        self.traffic.sent += request.ByteSize()
        self.traffic.received += reply.ByteSize()
        return reply

    def _receive(self, stream: Iterator[pb.WeightsMessage]) -> Assignment:
        first = next(stream, None)
        self.traffic.received += first.ByteSize() if first is not None else 0
        assignment = assignment_from_header(first)
        if assignment.instruction not in (Instruction.TRAIN, Instruction.EVALUATE):
            return assignment
        received = wire.assemble(assignment.all_specs, (self._counted(m).chunk for m in stream))
        return assignment.with_arrays(received.arrays, received.wire_bytes)

    def _counted(self, message: pb.WeightsMessage) -> pb.WeightsMessage:
        self.traffic.received += message.ByteSize()
        return message

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call`, tried again as self.retries says, waiting with time.sleep."""
        tries = self.retries.begin()
        while True:
            try:
                result = call()
            except grpc.RpcError as exc:
                time.sleep(self.retries.failed(what, tries, exc))
            else:
                self.retries.succeeded(what, tries)
                return result
