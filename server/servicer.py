"""The gRPC face of the coordinator: fedgrpc.v1.Coordinator over a RoundCoordinator.

The only module of fedgrpc.server that touches generated *_pb2 types, and the place where
fedgrpc's errors become gRPC status codes:

    AuthError               UNAUTHENTICATED, or PERMISSION_DENIED for another client's id
    NotEnrolledError        NOT_FOUND
    StaleRoundError         FAILED_PRECONDITION (the message names the open round)
    UpdateRejectedError     its own code (INVALID_ARGUMENT, ALREADY_EXISTS, ...)
    CodecError              INVALID_ARGUMENT
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import NoReturn

import grpc
import numpy as np
from fedgrpc.common import wire
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.errors import AuthError, CodecError, FedGrpcError, NotEnrolledError, UpdateRejectedError
from fedgrpc.server.auth import Authenticator
from fedgrpc.server.rounds import Instruction, RoundCoordinator
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_S = 30.0
_DEADLINE_MARGIN_S = 0.5
MAX_MESSAGE_BYTES = 16 << 20  # one chunk (1 MiB by default) and its framing; larger gets RESOURCE_EXHAUSTED

#: Accept the clients' keepalive pings (every 20 s, also between calls) instead of answering
#: them with GOAWAY, and bound what one message may make the server allocate.
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
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


class CoordinatorServicer(pb_grpc.CoordinatorServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(
        self,
        coordinator: RoundCoordinator,
        *,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        authenticator: Authenticator | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._auth = authenticator or Authenticator()
        self._max_wait_s = max_wait_s
        self._chunk_bytes = chunk_bytes
        self._encode_lock = threading.Lock()
        self._encoded: tuple[int, list[pb.WeightsMessage], int] | None = None

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
    ) -> Iterator[pb.WeightsMessage]:
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
        context.add_callback(self._coordinator.wake)
        try:
            task = self._coordinator.next_task(
                request.client_id, request.after_round, wait, active=context.is_active
            )
        except FedGrpcError as exc:
            _abort(context, exc, f"GetGlobalWeights of client {request.client_id}")
        if task.instruction is not Instruction.TRAIN:
            code = pb.FINISHED if task.instruction is Instruction.FINISHED else pb.WAIT
            run_id = self._coordinator.run.run_id
            yield pb.WeightsMessage(
                header=pb.WeightsHeader(instruction=code, round=task.round, run_id=run_id)
            )
            return
        messages, nbytes = self._encoded_weights(task.round, task.weights)
        yield from messages
        self._coordinator.count_bytes_out(task.round, nbytes)

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.UpdateMessage], context: grpc.ServicerContext
    ) -> pb.SubmitUpdateReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
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
            self._coordinator.check_header(header.client_id, header.round, header.num_examples, specs)
            received = wire.assemble(specs, self._chunks(request_iterator))
            count, expected = self._coordinator.submit(
                header.client_id,
                header.round,
                header.num_examples,
                dict(header.metrics),
                received.arrays,
                received.wire_bytes + first.ByteSize(),
            )
        except FedGrpcError as exc:
            _abort(context, exc, what)
        log.debug("accepted %s (%d/%d)", what, count, expected)
        return pb.SubmitUpdateReply(round=header.round, received=count, expected=expected)

    @staticmethod
    def _chunks(messages: Iterator[pb.UpdateMessage]) -> Iterator[pb.TensorChunk]:
        for message in messages:
            if message.WhichOneof("part") != "chunk":
                raise UpdateRejectedError("an update stream carries one header, then only tensor chunks")
            yield message.chunk

    def _encoded_weights(
        self, round_number: int, weights: tuple[np.ndarray, ...]
    ) -> tuple[list[pb.WeightsMessage], int]:
        """The round's weights as messages, encoded once and shared by every client's stream."""
        with self._encode_lock:
            if self._encoded is None or self._encoded[0] != round_number:
                messages = wire.weights_stream(
                    round_number,
                    self._coordinator.specs,
                    weights,
                    self._chunk_bytes,
                    run_id=self._coordinator.run.run_id,
                )
                self._encoded = (round_number, messages, sum(m.ByteSize() for m in messages))
            return self._encoded[1], self._encoded[2]


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
) -> Health:
    """Register the coordinator and the health service on a gRPC server; returns the health switch."""
    servicer = CoordinatorServicer(coordinator, max_wait_s=max_wait_s, authenticator=authenticator)
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    checker = Health()
    health_pb2_grpc.add_HealthServicer_to_server(checker.servicer, server)
    return checker
