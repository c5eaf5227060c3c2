"""The gRPC face of the coordinator: fedgrpc.v1.Coordinator over a RoundCoordinator, on grpc.aio.

The only module of fedgrpc.server that touches generated *_pb2 types, and the place where
fedgrpc's errors become gRPC status codes:

    AuthError               UNAUTHENTICATED, or PERMISSION_DENIED for another client's id
    NotEnrolledError        NOT_FOUND
    StaleRoundError         FAILED_PRECONDITION (the message names the open round)
    TaskMismatchError       FAILED_PRECONDITION (at Join: the client's task is not the run's)
    UpdateRejectedError     its own code (INVALID_ARGUMENT, ALREADY_EXISTS, UNAVAILABLE, ...)
    CodecError              INVALID_ARGUMENT (also for a stream message that does not parse)
    SecAggError             INVALID_ARGUMENT (a secure aggregation message that cannot be used)
    OverloadError           RESOURCE_EXHAUSTED (a limit of fedgrpc.server.limits), or UNAVAILABLE
    StalledError            DEADLINE_EXCEEDED (the stream sent nothing for the stall timeout)

Every handler is a coroutine on one event loop: a waiting long-poll or a silent stream costs
memory, not a thread. Each call is admitted in this order, before it may wait for anything:
the per-address limit, then credentials from the call's metadata, then (once the client id is
known) the per-client limit. Reads inside a stream are bounded by the stall timeout, the wait
for the in-flight budget by its own bound, whatever deadline the client set.

A call its client ends first (cancelled, past its deadline, or its connection closed) ends
quietly: gRPC cancels its handler, or a write to it fails; either is counted (a summary line,
fedgrpc_calls_ended_early_total), never a traceback. A failure of gRPC's on a call its client has
not ended is an error, and logged as one.

The service is registered by hand rather than through the generated add_*_to_server so the
weight streams can use fedgrpc.common.wire's serializers: chunks written with one copy, and a
request parser that reports garbage instead of raising.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import ExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote

import grpc
import numpy as np
from fedgrpc.common import secagg as sa
from fedgrpc.common import wire
from fedgrpc.common.codec import DEFAULT_CHUNK_BYTES
from fedgrpc.common.config import TaskRef
from fedgrpc.common.errors import (
    AuthError,
    CodecError,
    FedGrpcError,
    NotEnrolledError,
    OverloadError,
    SecAggError,
    StalledError,
    TaskMismatchError,
    UpdateRejectedError,
)
from fedgrpc.common.protocol import READY_FOR_CHUNKS_KEY, Instruction
from fedgrpc.server.auth import Authenticator, CallContext
from fedgrpc.server.intake import InflightBudget, UpdateIntake
from fedgrpc.server.limits import CallCounter, Limits, next_message
from fedgrpc.server.monitor import Monitor
from fedgrpc.server.refusals import RefusalLog
from fedgrpc.server.rounds import RoundAssignment, RoundCoordinator, UpdateHeader
from fedgrpc.server.secagg import SecAggRound
from fedgrpc.server.summary import EventSummary
from fedgrpc.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
_GRPC_LOG = logging.getLogger("grpc._cython.cygrpc")  # where gRPC logs its own failures

T = TypeVar("T")
Handler = Callable[[Any, CallContext], Awaitable[T]]
_DEADLINE_MARGIN_S = 0.5
MAX_MESSAGE_BYTES = 16 << 20  # one chunk (1 MiB by default) and its framing; larger gets RESOURCE_EXHAUSTED
DEFAULT_INFLIGHT_BYTES = 256 << 20
#: Tensors at least this big are decoded and prepared on a worker thread, so the event loop
#: keeps serving other calls meanwhile; smaller ones cost less than the hand-off.
OFFLOAD_BYTES = 256 << 10


def _status_of(error: FedGrpcError) -> grpc.StatusCode:
    if isinstance(error, AuthError | UpdateRejectedError | OverloadError):
        return grpc.StatusCode[error.code]
    if isinstance(error, NotEnrolledError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, TaskMismatchError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, CodecError | SecAggError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, StalledError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def peer_address(context: CallContext) -> str:
    """The peer's network address without its port: 'ipv4:10.0.0.7', 'ipv6:[::1]', 'unix:...'."""
    peer = unquote(context.peer() or "unknown")  # gRPC writes ipv6:%5B::1%5D:port
    address = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return address if address.isprintable() else ascii(address)  # it goes into log lines as is


class CoordinatorServicer:
    def __init__(
        self,
        coordinator: RoundCoordinator,
        *,
        limits: Limits | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        authenticator: Authenticator | None = None,
        inflight: InflightBudget | None = None,
        spool_dir: Path | None = None,
        executor: Executor | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._limits = limits or Limits()
        self._spool_dir = spool_dir
        self._auth = authenticator or Authenticator()
        self._chunk_bytes = chunk_bytes
        self._inflight = inflight or InflightBudget(DEFAULT_INFLIGHT_BYTES)
        self._executor = executor
        self._per_peer = CallCounter(self._limits.per_peer(coordinator.run.num_clients), "address")
        self._polls = CallCounter(self._limits.max_calls_per_client, "client")
        self._submits = CallCounter(self._limits.max_calls_per_client, "client")
        self._phase_future: asyncio.Future[None] | None = None
        self.monitor = monitor or Monitor(coordinator.run)
        self.refusals = RefusalLog(listener=self.monitor.refused)
        self.joins = EventSummary(log, "clients joined")
        self._joined: set[int] = set()
        self.ended_early = EventSummary(
            log,
            "calls ended by their client before they were answered (cancelled, past their deadline, "
            "or the connection closed)",
            first=0,
        )
        self._counting_ended = True
        self._grpc_log_filter = _CallGoneFilter()

    def count_calls_gone(self) -> None:
        """From now until close_summaries: gRPC's own failure to answer a call its client has
        ended is not logged (the endpoint calls this when it starts serving)."""
        _GRPC_LOG.removeFilter(self._grpc_log_filter)  # a second start adds no second filter
        _GRPC_LOG.addFilter(self._grpc_log_filter)

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """The fedgrpc.v1.Coordinator service, with the weight streams' own serializers."""
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "Join": grpc.unary_unary_rpc_method_handler(
                    self._quiet(self.Join),
                    request_deserializer=pb.JoinRequest.FromString,
                    response_serializer=pb.JoinReply.SerializeToString,
                ),
                "GetGlobalWeights": grpc.unary_stream_rpc_method_handler(
                    self._quiet(self.GetGlobalWeights),
                    request_deserializer=pb.GetGlobalWeightsRequest.FromString,
                    response_serializer=wire.serialize,
                ),
                "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
                    self._quiet(self.SubmitUpdate),
                    request_deserializer=wire.parse_update_message,
                    response_serializer=pb.SubmitUpdateReply.SerializeToString,
                ),
                "SubmitEvaluation": grpc.unary_unary_rpc_method_handler(
                    self._quiet(self.SubmitEvaluation),
                    request_deserializer=pb.EvaluationReport.FromString,
                    response_serializer=pb.SubmitEvaluationReply.SerializeToString,
                ),
                "Withdraw": grpc.unary_unary_rpc_method_handler(
                    self._quiet(self.Withdraw),
                    request_deserializer=pb.WithdrawRequest.FromString,
                    response_serializer=pb.WithdrawReply.SerializeToString,
                ),
                **self._secagg_handlers(),
            },
        )

    @property
    def open_calls(self) -> CallCounter:
        """Every call being served, counted by peer address."""
        return self._per_peer

    def phase_changed(self) -> None:
        """On the loop: wake every waiting long-poll (see RoundCoordinator.on_phase_change)."""
        future, self._phase_future = self._phase_future, None
        if future is not None and not future.done():
            future.set_result(None)

    def close_summaries(self) -> None:
        """The server is stopping: log the counts not yet reported; calls it cancels itself from
        now on are not counted as ended by their client."""
        self._counting_ended = False
        _GRPC_LOG.removeFilter(self._grpc_log_filter)
        self.joins.flush()
        self.ended_early.flush()

    def _quiet(self, method: Handler[T]) -> Handler[T]:
        """`method`, ending quietly when its client has ended the call, which is then counted.

        Counted once the call is over, if it ended with no status sent (context.done() false
        in its done callback): gRPC's server context never reports such a call as cancelled(),
        and a call that ended with an error status its client received is not one of them."""

        async def handle(request: Any, context: CallContext) -> T:
            context.add_done_callback(self._count_if_ended_early)  # type: ignore[arg-type]  # stubs: a class
            try:
                return await method(request, context)
            except grpc.aio.InternalError as exc:
                if not _is_batch_error(type(exc)):
                    raise  # a fault of its own, not a client gone: gRPC logs it and answers UNKNOWN
                # A send or receive on the call failed: its client has gone. gRPC ends a
                # cancelled handler quietly; the done callback counts the call if it is so.
                raise asyncio.CancelledError from None

        return handle

    def _count_if_ended_early(self, context: CallContext) -> None:
        if not context.done() and self._counting_ended:
            self.ended_early.event("")
            self.monitor.call_ended_early()

    # -- RPCs ----------------------------------------------------------------------

    async def Join(self, request: pb.JoinRequest, context: CallContext) -> pb.JoinReply:
        what = f"Join of client {request.client_id}"
        try:
            with self._per_peer.hold(peer_address(context)):
                self._auth.check(context, request.client_id)
                self._coordinator.check_client(request.client_id)
                self._check_task(request.client_id, wire.task_from_pb(request.task))
        except FedGrpcError as exc:
            await self._abort(context, exc, what, request.client_id)
        if request.client_id in self._joined:  # back after a crash or a restart: always worth a line
            self.joins.event(
                "client %d joined again from %s", request.client_id, peer_address(context), always=True
            )
        else:
            self._joined.add(request.client_id)  # ids the run enrols (check_client): bounded
            self.joins.event("client %d joined from %s", request.client_id, peer_address(context))
        self.monitor.client_joined(request.client_id, peer_address(context))
        return pb.JoinReply(
            run=wire.run_to_pb(self._coordinator.run), current_round=self._coordinator.current_round
        )

    async def GetGlobalWeights(self, request: pb.GetGlobalWeightsRequest, context: CallContext) -> None:
        client = request.client_id
        what = f"GetGlobalWeights of client {client}"
        try:
            with self._admitted(client, context):
                task = await self._wait_for_task(
                    client, request.after_round, self._poll_wait(request.max_wait_ms, context)
                )
                await self._send_task(client, task, context)
        except FedGrpcError as exc:
            await self._abort(context, exc, what, client)

    async def SubmitEvaluation(
        self, request: pb.EvaluationReport, context: CallContext
    ) -> pb.SubmitEvaluationReply:
        what = f"evaluation of client {request.client_id} for round {request.round}"
        try:
            with self._per_peer.hold(peer_address(context)):
                self._auth.check(context, request.client_id)
                received, expected = self._coordinator.submit_evaluation(
                    request.client_id, request.round, request.num_examples, dict(request.metrics)
                )
        except FedGrpcError as exc:
            await self._abort(context, exc, what, request.client_id)
        self.monitor.evaluation_reported(request.client_id, request.round)
        return pb.SubmitEvaluationReply(round=request.round, received=received, expected=expected)

    async def Withdraw(self, request: pb.WithdrawRequest, context: CallContext) -> pb.WithdrawReply:
        what = f"withdrawal of client {request.client_id}"
        address = peer_address(context)
        try:
            with self._per_peer.hold(address):
                self._auth.check(context, request.client_id)
                reason = wire.checked_text(request.reason, "WithdrawRequest.reason", wire.MAX_REASON)
                new = self._coordinator.withdraw(request.client_id, reason)
        except FedGrpcError as exc:
            await self._abort(context, exc, what, request.client_id)
        if new:  # a reason said again is not logged again; new ones are held to the refusals' limits
            self.refusals.withdrew(address, request.client_id, reason)
        self.monitor.withdrew(address, request.client_id, reason)
        return pb.WithdrawReply()

    def _check_task(self, client_id: int, task: TaskRef) -> None:
        """A client that runs task code must run the run's task: same name, same file."""
        run_task = self._coordinator.run.task
        if (task.name or task.digest) and task != run_task:
            raise TaskMismatchError(
                f"client {client_id} runs task {task.name!r} (file digest {task.digest[:12]}), but this "
                f"run's task is {run_task.name!r} (file digest {run_task.digest[:12]}): give the client "
                "the same --task file as the server"
            )

    async def _send_task(self, client: int, task: RoundAssignment, context: CallContext) -> None:
        run_id = self._coordinator.run.run_id
        if task.instruction in (Instruction.WAIT, Instruction.FINISHED):
            header = pb.WeightsHeader(
                instruction=wire.instruction_to_pb(task.instruction), round=task.round, run_id=run_id
            )
            await self._write(context, pb.WeightsMessage(header=header))
            self.monitor.waiting(client, finished=task.instruction is Instruction.FINISHED)
            return
        kind = "download" if task.instruction is Instruction.TRAIN else "evaluate"
        self.monitor.task_started(client, task.round, kind)
        # Encoded per call, chunk by chunk: the server keeps one copy of the weights (the
        # round's arrays), not one per client or an encoded second copy. A reader that stops
        # reading holds about one chunk here, until the stall timeout cuts it.
        sent = 0
        for message in wire.weights_stream(
            task.round,
            self._coordinator.specs,
            task.weights,
            self._chunk_bytes,
            run_id=run_id,
            instruction=task.instruction,
        ):
            await self._write(context, message)
            sent += len(message) if isinstance(message, bytes) else message.ByteSize()
        self._coordinator.count_bytes_out(task.round, sent)
        self.monitor.task_sent(client, task.round, sent)

    async def _write(self, context: CallContext, message: pb.WeightsMessage | bytes) -> None:
        try:
            await asyncio.wait_for(context.write(message), self._limits.stall_timeout_s)
        except asyncio.TimeoutError:
            raise StalledError(
                f"the client read nothing for {self._limits.stall_timeout_s:.0f} s; the stream was cut"
            ) from None

    async def SubmitUpdate(
        self,
        request_iterator: AsyncIterator[pb.UpdateMessage | wire.Undecodable],
        context: CallContext,
    ) -> pb.SubmitUpdateReply:
        what, client = "SubmitUpdate", None
        try:
            with self._per_peer.hold(peer_address(context)):
                proven = self._auth.identify(context)  # before any message is awaited
                messages = aiter(request_iterator)
                first = await next_message(messages, self._limits.stall_timeout_s, "the update's header")
                if not isinstance(first, pb.UpdateMessage) or first.WhichOneof("part") != "header":
                    raise UpdateRejectedError("an update stream must start with its header")
                header = first.header
                what = f"update of client {header.client_id} for round {header.round}"
                self._auth.require(proven, header.client_id)
                client = header.client_id
                with self._submits.hold(header.client_id):
                    count, expected = await self._receive_update(header, first.ByteSize(), messages, context)
        except FedGrpcError as exc:
            await self._abort(context, exc, what, client)
        log.debug("accepted %s (%d/%d)", what, count, expected)
        return pb.SubmitUpdateReply(round=header.round, received=count, expected=expected)

    # -- secure aggregation's steps ------------------------------------------------

    def _secagg_handlers(self) -> dict[str, grpc.RpcMethodHandler]:  # type: ignore[type-arg]
        def unary(method: Handler[Any], request: Any) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
            return grpc.unary_unary_rpc_method_handler(
                self._quiet(method),
                request_deserializer=request.FromString,
                response_serializer=lambda reply: reply.SerializeToString(),
            )

        return {
            "AdvertiseKeys": unary(self.AdvertiseKeys, pb.AdvertiseKeysRequest),
            "GetSecAggStage": unary(self.GetSecAggStage, pb.SecAggStageRequest),
            "ShareKeys": unary(self.ShareKeys, pb.ShareKeysRequest),
            "RevealShares": unary(self.RevealShares, pb.RevealSharesRequest),
        }

    async def AdvertiseKeys(self, request: pb.AdvertiseKeysRequest, context: CallContext) -> pb.SecAggAck:
        async with self._secagg_step(request.client_id, request.round, "keys", context) as secure:
            secure.advertise(
                request.client_id, request.cipher_public_key, request.mask_public_key, request.commitment
            )
        return pb.SecAggAck(round=request.round)

    async def ShareKeys(self, request: pb.ShareKeysRequest, context: CallContext) -> pb.SecAggAck:
        async with self._secagg_step(request.client_id, request.round, "shares", context) as secure:
            ciphertexts = {s.client_id: s.ciphertext for s in request.shares}
            if len(ciphertexts) != len(request.shares):
                raise SecAggError("two ciphertexts for one neighbour")
            secure.share(request.client_id, ciphertexts, request.session)
        return pb.SecAggAck(round=request.round)

    async def RevealShares(self, request: pb.RevealSharesRequest, context: CallContext) -> pb.SecAggAck:
        async with self._secagg_step(request.client_id, request.round, "revealed shares", context) as secure:
            shares = [
                (s.owner, wire.share_kind_from_pb(s.kind), sa.Share(s.index, s.value)) for s in request.shares
            ]
            secure.reveal(request.client_id, shares, request.session)
        return pb.SecAggAck(round=request.round)

    async def GetSecAggStage(self, request: pb.SecAggStageRequest, context: CallContext) -> pb.SecAggStage:
        view: sa.Stage | None = None
        async with self._secagg_step(request.client_id, request.round, "stage request", context) as secure:
            step = wire.step_from_pb(request.step)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._poll_wait(request.max_wait_ms, context)
            while True:
                if self._phase_future is None:  # taken first: a change after the look resolves it
                    self._phase_future = loop.create_future()
                changed = self._phase_future
                view = secure.view(request.client_id, step)
                if view is not None or loop.time() >= deadline:
                    break
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(changed), deadline - loop.time())
        return wire.stage_to_pb(request.round, view or sa.Stage(sa.StageStatus.WAIT))

    @asynccontextmanager
    async def _secagg_step(
        self, client: int, round_number: int, what: str, context: CallContext
    ) -> AsyncIterator[SecAggRound]:
        """Admit one secure aggregation call (address limit, credentials, the client's own
        limit) and hand over its round's SecAggRound; errors become the call's status."""
        try:
            with self._admitted(client, context):
                yield self._coordinator.secure_round_of(round_number)
        except FedGrpcError as exc:
            await self._abort(context, exc, f"secure aggregation {what} of client {client}", client)

    # -- internals -----------------------------------------------------------------

    @contextmanager
    def _admitted(self, client: int, context: CallContext) -> Iterator[None]:
        """A call that may wait: the address's limit, credentials, the client id, then the
        client's own limit on such calls (long-polls and secure aggregation's steps)."""
        with ExitStack() as admitted:
            admitted.enter_context(self._per_peer.hold(peer_address(context)))
            self._auth.check(context, client)
            self._coordinator.check_client(client)
            admitted.enter_context(self._polls.hold(client))
            yield

    def _poll_wait(self, max_wait_ms: int, context: CallContext) -> float:
        """How long this long-poll may be held: the server's cap, the client's wish, its deadline."""
        wait = self._limits.max_wait_s
        if max_wait_ms:
            wait = min(wait, max_wait_ms / 1000)
        return max(0.0, min(wait, self._time_left(context)))

    @staticmethod
    def _time_left(context: CallContext) -> float:
        remaining = context.time_remaining()
        if remaining is None or remaining > 1e9:  # no deadline (some versions report a huge one)
            return float("inf")
        return float(remaining) - _DEADLINE_MARGIN_S

    async def _wait_for_task(self, client_id: int, after_round: int, wait: float) -> RoundAssignment:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            # Taken before polling: a phase change after the poll resolves this very future.
            if self._phase_future is None:
                self._phase_future = loop.create_future()
            changed = self._phase_future
            task = self._coordinator.poll_task(client_id, after_round)
            if task is not None:
                return task
            remaining = deadline - loop.time()
            if remaining <= 0:
                return RoundAssignment(Instruction.WAIT, self._coordinator.current_round)
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(changed), remaining)

    async def _receive_update(
        self,
        header: pb.UpdateHeader,
        header_bytes: int,
        messages: AsyncIterator[pb.UpdateMessage | wire.Undecodable],
        context: CallContext,
    ) -> tuple[int, int]:
        """Admit the update from its header (the one check), take its chunks through an intake
        that prepares each tensor, and commit it."""
        method = wire.compression_from_pb(header.compression)
        specs = tuple(wire.spec_from_pb(t) for t in header.tensors)
        admitted = self._coordinator.admit(
            UpdateHeader(
                client_id=header.client_id,
                round=header.round,
                num_examples=header.num_examples,
                specs=specs,
                metrics=dict(header.metrics),
                session=header.session,
                encoding=method,
            )
        )
        size = UpdateIntake.wire_size(specs, method)
        self.monitor.upload_started(header.client_id, header.round)
        wait = min(self._limits.inflight_wait_s, self._time_left(context))
        reservation = await self._inflight.reserve(size, wait)
        if reservation is None:
            raise OverloadError(
                "the server is busy receiving other updates; send this one again", code="UNAVAILABLE"
            )
        intake: UpdateIntake | None = None
        try:
            await context.send_initial_metadata(((READY_FOR_CHUNKS_KEY, "1"),))
            intake = UpdateIntake(
                specs,
                admitted.reference,
                method,
                list(header.scales),
                prepare=admitted.preparer,
                spool_dir=self._spool_dir,
            )
            received = await self._chunks_into(intake, messages)

            def folded(intake: UpdateIntake = intake) -> None:
                # The reservation ends once the update is folded in (or refused), not when
                # the stream ends: until then its tensors are still staged.
                intake.close()
                reservation.release()

            result = admitted.commit(received, size + header_bytes, on_folded=folded)
            self.monitor.update_accepted(header.client_id, header.round, size + header_bytes)
            return result
        except BaseException:
            if intake is not None:
                intake.close()
            reservation.release()
            raise

    async def _chunks_into(
        self, intake: UpdateIntake, messages: AsyncIterator[pb.UpdateMessage | wire.Undecodable]
    ) -> Sequence[np.ndarray]:
        number = 1
        while True:
            message = await next_message(messages, self._limits.stall_timeout_s, "the next chunk")
            if message is None:
                break
            number += 1
            if isinstance(message, wire.Undecodable):
                raise CodecError(
                    f"message #{number} of the update stream ({message.size} bytes) is not a valid "
                    f"UpdateMessage: {message.reason}"
                )
            if message.WhichOneof("part") != "chunk":
                raise UpdateRejectedError("an update stream carries one header, then only tensor chunks")
            chunk = message.chunk
            ready = intake.add(chunk.tensor_index, chunk.offset, chunk.data)
            if ready:
                await self._run(intake.process, big=ready >= OFFLOAD_BYTES)
        return await self._run(intake.finish, big=False)

    async def _run(self, work: Callable[[], T], *, big: bool) -> T:
        if big and self._executor is not None:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        return work()

    async def _abort(
        self, context: CallContext, error: FedGrpcError, what: str, client_id: int | None = None
    ) -> NoReturn:
        code = _status_of(error)
        self.refusals.refused(peer_address(context), code.name, what, str(error), client_id)
        await context.abort(code, str(error))
        raise AssertionError("unreachable: context.abort raises")


class _CallGoneFilter(logging.Filter):
    """Keeps gRPC's own traceback out of the log when it fails to send the reply or status of a
    call whose client already ended it (an ExecuteBatchError after the handler returned); the
    servicer counts that call when it is done. Any other error of gRPC's is logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[0] if record.exc_info else None
        # ExecuteBatchError (grpc._cython.cygrpc's, not in grpc's public API): a send that failed
        if error is not None and issubclass(error, grpc.aio.InternalError) and _is_batch_error(error):
            log.debug("a call ended before its answer was sent: %s", record.getMessage())
            return False
        return True


def _is_batch_error(error: type[BaseException]) -> bool:
    """Whether `error` is gRPC's ExecuteBatchError (not in its public API): an operation on a
    call that failed, which is what a call whose client has gone gives."""
    return any(cls.__name__ == "ExecuteBatchError" for cls in error.__mro__)
