"""The client's link to the coordinator: the calls it makes, with retries.

Connection makes them blocking (fl-client); AioConnection (fedgrpc.client.aio_connection) makes
a light client's calls on grpc.aio, so one event loop can run thousands of simulated clients.
Both take their retry policy (Retries) and their reading of a task's header (task_from_header)
from here, one copy for both. These two are the only modules of fedgrpc.client that touch
generated *_pb2 types; this is the place where gRPC status codes become fedgrpc errors:

    UNAVAILABLE, DEADLINE_EXCEEDED,  retried with exponential backoff and jitter until the
    CANCELLED, RESOURCE_EXHAUSTED    connect timeout, then ServerUnavailableError (the server
                                     is down, restarting, or at one of its limits)
    UNAUTHENTICATED                  AuthError (missing or wrong credentials)
    PERMISSION_DENIED                AuthError (credentials of another client)
    NOT_FOUND                        NotEnrolledError
    FAILED_PRECONDITION              StaleRoundError (TaskMismatchError when it answers Join)
    anything else                    UpdateRejectedError with the server's message
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from fedgrpc.common import compression, wire
from fedgrpc.common import secagg as sa
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES, TensorSpec
from fedgrpc.common.config import RunSpec, TaskRef
from fedgrpc.common.errors import (
    AuthError,
    ConfigError,
    FedGrpcError,
    NotEnrolledError,
    ServerUnavailableError,
    StaleRoundError,
    TaskMismatchError,
    UpdateRejectedError,
)
from fedgrpc.common.metrics import check_metrics
from fedgrpc.common.protocol import AUTHORIZATION_KEY, BEARER_PREFIX, Instruction
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
# CANCELLED too: this client never cancels its own calls, so a cancel comes from a server stopping.
# RESOURCE_EXHAUSTED: the server is at a limit on open calls (its messages are far below the
# size limit), which frees up as other calls end.
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def wake_waiting_calls_every(seconds: float) -> None:
    """For a process whose many threads each wait on a call (simulated clients, load tests).

    gRPC's blocking API wakes every waiting thread ten times a second, so that a signal reaches
    the main thread soon; with thousands of threads those wake-ups alone keep the cores busy in
    the kernel and starve the calls themselves. This lengthens the interval for the process
    (Ctrl-C then takes up to `seconds` to act on a thread blocked in a call)."""
    from grpc import _common

    if not isinstance(getattr(_common, "MAXIMUM_WAIT_TIMEOUT", None), float):
        log.warning("this grpcio has no MAXIMUM_WAIT_TIMEOUT: waiting threads wake at its own pace")
        return
    _common.MAXIMUM_WAIT_TIMEOUT = seconds


#: Channel settings: keepalive pings so a dead server is noticed during a long poll, and
#: message limits well above one chunk (streams never need more).
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 << 20),
]


@dataclass(frozen=True)
class Task:
    instruction: Instruction
    round: int
    specs: tuple[TensorSpec, ...] = ()
    weights: list[np.ndarray] = field(default_factory=list)
    wire_bytes: int = 0
    run_id: str = ""


@dataclass
class Traffic:
    """Protobuf bytes this connection sent and received (gRPC's own framing not counted)."""

    sent: int = 0
    received: int = 0


@dataclass(frozen=True)
class ChannelSecurity:
    """How this client proves the server is real (TLS, `ca`) and who it is itself (`token`, or a
    certificate `cert`/`key` under mutual TLS). No `ca` means plain text: only with --insecure."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    server_name: str | None = None  # the name in the server's certificate, when not the host dialled

    def channel(self, target: str) -> grpc.Channel:
        if self.ca is None:
            return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        credentials, options = self._tls()
        return grpc.secure_channel(target, credentials, options=options)

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        """The same channel for grpc.aio (call from the event loop that will use it)."""
        if self.ca is None:
            return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        credentials, options = self._tls()
        return grpc.aio.secure_channel(target, credentials, options=options)

    def _tls(self) -> tuple[grpc.ChannelCredentials, list[tuple[str, int | str]]]:
        assert self.ca is not None
        try:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.ca.read_bytes(),
                private_key=self.key.read_bytes() if self.key else None,
                certificate_chain=self.cert.read_bytes() if self.cert else None,
            )
        except OSError as exc:
            raise ConfigError(f"cannot read TLS files: {exc}") from None
        options = list(CHANNEL_OPTIONS)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return credentials, options

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_KEY, f"{BEARER_PREFIX}{self.token}"),) if self.token else ()


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, bounded by a total time budget."""

    initial_s: float = 0.25
    maximum_s: float = 5.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        while True:
            yield random.uniform(0, delay)
            delay = min(self.maximum_s, delay * self.multiplier)


def _error_from(exc: grpc.RpcError) -> FedGrpcError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(details)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return AuthError(details, code="PERMISSION_DENIED")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotEnrolledError(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return StaleRoundError(details)
    return UpdateRejectedError(details or code.name, code=code.name)


_INSTRUCTIONS = {
    pb.TRAIN: Instruction.TRAIN,
    pb.WAIT: Instruction.WAIT,
    pb.FINISHED: Instruction.FINISHED,
    pb.EVALUATE: Instruction.EVALUATE,
}


def task_from_header(first: pb.WeightsMessage | None) -> Task:
    """The task that a weights stream's first message announces, without its weights.

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
    return Task(instruction, header.round, specs, run_id=header.run_id)


@dataclass
class Tries:
    """One call's tries so far (see Retries)."""

    deadline: float
    delays: Iterator[float]
    failures: int = 0


class Retries:
    """When a failed call is tried again, and what the log says about it, for one connection.

    Retryable codes are tried again with `backoff` until `connect_timeout_s` has passed, then
    ServerUnavailableError; other codes become fedgrpc errors at once. The first answer after
    failures logs that the server "answered", later ones that it "is back"."""

    def __init__(self, target: str, connect_timeout_s: float, backoff: Backoff) -> None:
        self.target, self.connect_timeout_s, self.backoff = target, connect_timeout_s, backoff
        self.answered = False  # whether the server has answered this connection once
        self.retried: dict[str, int] = {}  # calls retried, by the status code that failed them

    def begin(self) -> Tries:
        return Tries(time.monotonic() + self.connect_timeout_s, self.backoff.delays())

    def succeeded(self, what: str, tries: Tries) -> None:
        if tries.failures:
            how = "is back" if self.answered else "answered"
            log.info("%s: server at %s %s", what, self.target, how)
        self.answered = True

    def failed(self, what: str, tries: Tries, exc: grpc.RpcError) -> float:
        """The seconds to wait before the next try; raises when there is none."""
        code = exc.code()
        if code not in _RETRYABLE:
            raise _error_from(exc) from None
        tries.failures += 1
        self.retried[code.name] = self.retried.get(code.name, 0) + 1
        if tries.failures == 1 and what != "join":
            log.warning(
                "%s: %s (%s); retrying for up to %.0f s",
                what,
                code.name,
                exc.details(),
                self.connect_timeout_s,
            )
        remaining = tries.deadline - time.monotonic()
        if remaining <= 0:
            raise ServerUnavailableError(
                f"could not {what} at {self.target} for {self.connect_timeout_s:.0f} s "
                f"({code.name}: {exc.details()}); is fl-server running there?"
            ) from None
        delay = min(next(tries.delays), remaining)
        log.debug("%s: %s, retrying in %.2f s", what, code.name, delay)
        return delay


class Connection:
    """One client's channel to the server."""

    def __init__(
        self,
        target: str,
        client_id: int,
        *,
        connect_timeout_s: float = 60.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        backoff: Backoff = Backoff(),
        security: ChannelSecurity | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        """`channel`: one to share with other Connections of this process (many simulated
        clients: one channel, one polling thread, instead of one each); it is not closed here."""
        self.target = target
        self.client_id = client_id
        self.connect_timeout_s = connect_timeout_s
        self.chunk_bytes = chunk_bytes
        self.backoff = backoff
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

    def join(self, task: TaskRef | None = None) -> tuple[RunSpec, int]:
        """The run's spec and its current round; retries while the server is not up yet.

        `task`: the task this client runs, which the server compares with the run's (None: a
        client that runs no task code)."""
        request = pb.JoinRequest(client_id=self.client_id, task=wire.task_to_pb(task))
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
        request = pb.EvaluationReport(
            client_id=self.client_id,
            round=round_number,
            num_examples=num_examples,
            metrics=check_metrics(metrics),
        )
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
            log.debug("the server did not take this client's withdrawal: %s", _error_from(exc))
            return False
        return True

    def next_task(self, after_round: int, max_wait_s: float = 30.0) -> Task:
        """Long-poll for what to do after `after_round`; the weights come with a TRAIN task."""
        request = pb.GetGlobalWeightsRequest(
            client_id=self.client_id, after_round=after_round, max_wait_ms=int(max_wait_s * 1000)
        )
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
        method: str = "none",
        reference: Sequence[np.ndarray] = (),
        session: bytes = b"",
    ) -> tuple[int, int]:
        """Send trained weights; returns (updates the round has received, updates it expects).

        With a `method` other than "none" the update travels compressed relative to
        `reference`, the global weights the round's training started from.
        """
        metrics = check_metrics(metrics)  # the server would refuse them: say so here, before training is lost
        arrays, scales = compression.encode(specs, weights, reference, method)

        def call() -> pb.SubmitUpdateReply:
            stream = wire.update_stream(
                client_id=self.client_id,
                round_number=round_number,
                num_examples=num_examples,
                metrics=metrics,
                specs=specs,
                arrays=arrays,
                chunk_bytes=self.chunk_bytes,
                compression=method,
                scales=scales,
                session=session,
            )
            started = threading.Event()
            calls: list[Any] = []  # the call: a grpc.Future that is also a grpc.Call

            def paced() -> Iterator[pb.UpdateMessage | bytes]:
                # The header goes at once; the chunks only when the server says it is ready
                # for them (its initial metadata), so an update waiting for the server's
                # in-flight budget waits here, not in the server's memory.
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

        reply = self._retrying("submit", call)
        return reply.received, reply.expected

    # -- secure aggregation's steps (fedgrpc.client.secagg drives them) ------------------------

    def advertise_keys(
        self, round_number: int, cipher_key: bytes, mask_key: bytes, commitment: bytes
    ) -> None:
        request = pb.AdvertiseKeysRequest(
            client_id=self.client_id,
            round=round_number,
            cipher_public_key=cipher_key,
            mask_public_key=mask_key,
            commitment=commitment,
        )
        self._unary("advertise keys", self._stub.AdvertiseKeys, request)

    def secagg_stage(self, round_number: int, step: sa.Step, max_wait_s: float = 30.0) -> sa.Stage:
        """Long-poll until `step` may start."""
        request = pb.SecAggStageRequest(
            client_id=self.client_id,
            round=round_number,
            step=wire.step_to_pb(step),
            max_wait_ms=int(max_wait_s * 1000),
        )
        reply = self._unary("secure aggregation stage", self._stub.GetSecAggStage, request, max_wait_s + 30)
        return wire.stage_from_pb(reply)

    def share_keys(self, round_number: int, ciphertexts: Mapping[int, bytes], session: bytes) -> None:
        request = pb.ShareKeysRequest(
            client_id=self.client_id,
            round=round_number,
            session=session,
            shares=[pb.EncryptedShares(client_id=v, ciphertext=c) for v, c in ciphertexts.items()],
        )
        self._unary("share keys", self._stub.ShareKeys, request)

    def reveal_shares(
        self, round_number: int, shares: Sequence[tuple[int, str, sa.Share]], session: bytes
    ) -> None:
        kinds = {"self_mask": pb.SELF_MASK_SEED, "mask_key": pb.MASK_KEY}
        request = pb.RevealSharesRequest(
            client_id=self.client_id,
            round=round_number,
            session=session,
            shares=[
                pb.RevealedShare(owner=owner, kind=kinds[kind], index=share.index, value=share.value)
                for owner, kind, share in shares
            ],
        )
        self._unary("reveal shares", self._stub.RevealShares, request)

    def _unary(self, what: str, method: Callable[..., Any], request: Any, timeout: float = 30) -> Any:
        """One unary call, retried (see _retrying), its bytes counted."""
        reply = self._retrying(what, lambda: method(request, timeout=timeout, metadata=self._metadata))
        self.traffic.sent += request.ByteSize()
        self.traffic.received += reply.ByteSize()
        return reply

    def _receive(self, stream: Iterator[pb.WeightsMessage]) -> Task:
        first = next(stream, None)
        self.traffic.received += first.ByteSize() if first is not None else 0
        task = task_from_header(first)
        if task.instruction not in (Instruction.TRAIN, Instruction.EVALUATE):
            return task
        received = wire.assemble(task.specs, (self._counted(m).chunk for m in stream))
        return replace(task, weights=received.arrays, wire_bytes=received.wire_bytes)

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


def message_size(message: pb.UpdateMessage | bytes) -> int:
    return len(message) if isinstance(message, bytes) else message.ByteSize()
