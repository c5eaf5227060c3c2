"""The gRPC face of the coordinator: fedgrpc.v1.Coordinator over a RoundCoordinator.

The only module of fedgrpc.server that touches generated *_pb2 types, and the place where
fedgrpc's errors become gRPC status codes:

    AuthError               UNAUTHENTICATED, or PERMISSION_DENIED for another client's id
    NotEnrolledError        NOT_FOUND
    StaleRoundError         FAILED_PRECONDITION (the message names the open round)
    UpdateRejectedError     its own code (INVALID_ARGUMENT, ALREADY_EXISTS, ...)
    CodecError              INVALID_ARGUMENT (also for a stream message that does not parse)

The service is registered by hand rather than through the generated add_*_to_server so the
weight streams can use fedgrpc.common.wire's serializers: chunks written with one copy, and a
request parser that reports garbage instead of raising.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import grpc
import numpy as np
from fedgrpc.common import wire
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.errors import AuthError, CodecError, FedGrpcError, NotEnrolledError, UpdateRejectedError
from fedgrpc.server.auth import Authenticator
from fedgrpc.server.intake import InflightBudget, UpdateIntake
from fedgrpc.server.rounds import Instruction, RoundCoordinator
from fedgrpc.v1 import coordinator_pb2 as pb
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_S = 30.0
_DEADLINE_MARGIN_S = 0.5
MAX_MESSAGE_BYTES = 16 << 20  # one chunk (1 MiB by default) and its framing; larger gets RESOURCE_EXHAUSTED
DEFAULT_INFLIGHT_BYTES = 256 << 20
#: Initial metadata of SubmitUpdate, sent once the update fits the in-flight budget: clients
#: hold their chunks back until then, so waiting updates do not pile up in the server's memory.
READY_FOR_CHUNKS = (
    "fedgrpc-ready-for-chunks"  # updates received at once (see fedgrpc.server.intake.InflightBudget)
)

#: Accept the clients' keepalive pings (every 20 s, also between calls) instead of answering
#: them with GOAWAY, and bound what one message may make the server allocate.
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
]


def _status_of(error: FedGrpcError) -> grpc.StatusCode:
    if isinstance(error, AuthError):
        return grpc.StatusCode[error.code]
    if isinstance(error, NotEnrolledError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, UpdateRejectedError):
        return grpc.StatusCode[error.code]
    if isinstance(error, CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, error: FedGrpcError, what: str) -> NoReturn:
    code = _status_of(error)
    log.warning("refused %s from %s: %s %s", what, context.peer(), code.name, error)
    context.abort(code, str(error))
    raise AssertionError("unreachable: context.abort raises")


class CoordinatorServicer:
    def __init__(
        self,
        coordinator: RoundCoordinator,
        *,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        authenticator: Authenticator | None = None,
        inflight: InflightBudget | None = None,
        spool_dir: Path | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._spool_dir = spool_dir
        self._auth = authenticator or Authenticator()
        self._max_wait_s = max_wait_s
        self._chunk_bytes = chunk_bytes
        self._inflight = inflight or InflightBudget(DEFAULT_INFLIGHT_BYTES)

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """The fedgrpc.v1.Coordinator service, with the weight streams' own serializers."""
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "Join": grpc.unary_unary_rpc_method_handler(
                    self.Join,
                    request_deserializer=pb.JoinRequest.FromString,
                    response_serializer=pb.JoinReply.SerializeToString,
                ),
                "GetGlobalWeights": grpc.unary_stream_rpc_method_handler(
                    self.GetGlobalWeights,
                    request_deserializer=pb.GetGlobalWeightsRequest.FromString,
                    response_serializer=wire.serialize,
                ),
                "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
                    self.SubmitUpdate,
                    request_deserializer=wire.parse_update_message,
                    response_serializer=pb.SubmitUpdateReply.SerializeToString,
                ),
            },
        )

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        try:
            self._auth.check(context, request.client_id)
            self._coordinator.check_client(request.client_id)
        except AuthError as exc:
            context.abort(_status_of(exc), str(exc))  # logged by the authenticator, once per peer
        except FedGrpcError as exc:
            _abort(context, exc, f"Join of client {request.client_id}")
        log.info("client %d joined from %s", request.client_id, context.peer())
        return pb.JoinReply(
            run=wire.run_to_pb(self._coordinator.run), current_round=self._coordinator.current_round
        )

    def GetGlobalWeights(
        self, request: pb.GetGlobalWeightsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WeightsMessage | bytes]:
        wait = self._max_wait_s
        if request.max_wait_ms:
            wait = min(wait, request.max_wait_ms / 1000)
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - _DEADLINE_MARGIN_S))
        try:
            self._auth.check(context, request.client_id)
        except AuthError as exc:
            context.abort(_status_of(exc), str(exc))
        answered = threading.Event()

        def on_end() -> None:  # a call that ended while still waiting was cancelled: wake it
            if not answered.is_set():
                self._coordinator.wake()

        context.add_callback(on_end)
        try:
            task = self._coordinator.next_task(
                request.client_id, request.after_round, wait, active=context.is_active
            )
        except FedGrpcError as exc:
            _abort(context, exc, f"GetGlobalWeights of client {request.client_id}")
        finally:
            answered.set()
        if task.instruction is not Instruction.TRAIN:
            code = pb.FINISHED if task.instruction is Instruction.FINISHED else pb.WAIT
            run_id = self._coordinator.run.run_id
            yield pb.WeightsMessage(
                header=pb.WeightsHeader(instruction=code, round=task.round, run_id=run_id)
            )
            return
        # Encoded per call, chunk by chunk: the server keeps one copy of the weights (the
        # round's arrays), not one per client or an encoded second copy.
        sent = 0
        for message in wire.weights_stream(
            task.round,
            self._coordinator.specs,
            task.weights,
            self._chunk_bytes,
            run_id=self._coordinator.run.run_id,
        ):
            sent += len(message) if isinstance(message, bytes) else message.ByteSize()
            yield message
        self._coordinator.count_bytes_out(task.round, sent)

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.UpdateMessage | wire.Undecodable], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateReply:
        first = next(request_iterator, None)
        if not isinstance(first, pb.UpdateMessage) or first.WhichOneof("part") != "header":
            _abort(
                context, UpdateRejectedError("an update stream must start with its header"), "SubmitUpdate"
            )
        header = first.header
        what = f"update of client {header.client_id} for round {header.round}"
        try:
            self._auth.check(context, header.client_id)
        except AuthError as exc:
            context.abort(_status_of(exc), str(exc))
        try:
            specs = [wire.spec_from_pb(t) for t in header.tensors]
            reference = self._coordinator.check_header(
                header.client_id, header.round, header.num_examples, specs
            )
            method = wire.compression_from_pb(header.compression)
            size = UpdateIntake.wire_size(specs, method)
            reservation = self._inflight.reserve(size, context.time_remaining())
            if reservation is None:
                raise UpdateRejectedError(
                    "the server is busy receiving other updates; send this one again", code="UNAVAILABLE"
                )
            context.send_initial_metadata(((READY_FOR_CHUNKS, "1"),))
            prepare = self._coordinator.tensor_preparer(reference, header.num_examples)
            try:
                intake = UpdateIntake(
                    specs, reference, method, list(header.scales), prepare=prepare, spool_dir=self._spool_dir
                )
            except BaseException:
                reservation.release()
                raise
            try:
                received = self._receive(intake, request_iterator)
            except BaseException:
                intake.close()
                reservation.release()
                raise

            def folded() -> None:
                # The reservation ends once the update is folded in (or refused), not when
                # the stream ends: until then its tensors are still staged.
                intake.close()
                reservation.release()

            count, expected = self._coordinator.submit(
                header.client_id,
                header.round,
                header.num_examples,
                dict(header.metrics),
                received,
                size + first.ByteSize(),
                checked=True,
                prepared=prepare is not None,
                on_folded=folded,
            )
        except FedGrpcError as exc:
            _abort(context, exc, what)
        log.debug("accepted %s (%d/%d)", what, count, expected)
        return pb.SubmitUpdateReply(round=header.round, received=count, expected=expected)

    @staticmethod
    def _receive(
        intake: UpdateIntake, messages: Iterator[pb.UpdateMessage | wire.Undecodable]
    ) -> Sequence[np.ndarray]:
        for number, message in enumerate(messages, start=2):
            if isinstance(message, wire.Undecodable):
                raise CodecError(
                    f"message #{number} of the update stream ({message.size} bytes) is not a valid "
                    f"UpdateMessage: {message.reason}"
                )
            if message.WhichOneof("part") != "chunk":
                raise UpdateRejectedError("an update stream carries one header, then only tensor chunks")
            chunk = message.chunk
            intake.add(chunk.tensor_index, chunk.offset, chunk.data)
        return intake.finish()


class Health:
    """The standard grpc.health.v1 service, SERVING only while the coordinator can take clients."""

    SERVICES = ("", "fedgrpc.v1.Coordinator")

    def __init__(self) -> None:
        self.servicer = health.HealthServicer()
        self.serving(False)

    def serving(self, up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in self.SERVICES:
            self.servicer.set(service, status)


def serve(
    server: grpc.Server,
    coordinator: RoundCoordinator,
    *,
    max_wait_s: float = DEFAULT_MAX_WAIT_S,
    authenticator: Authenticator | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    inflight: InflightBudget | None = None,
    spool_dir: Path | None = None,
) -> Health:
    """Register the coordinator and the health service on a gRPC server; returns the health switch."""
    servicer = CoordinatorServicer(
        coordinator,
        max_wait_s=max_wait_s,
        chunk_bytes=chunk_bytes,
        authenticator=authenticator,
        inflight=inflight,
        spool_dir=spool_dir,
    )
    server.add_generic_rpc_handlers((servicer.handler(),))
    checker = Health()
    health_pb2_grpc.add_HealthServicer_to_server(checker.servicer, server)
    return checker
