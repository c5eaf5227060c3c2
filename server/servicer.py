"""The gRPC face of the coordinator: fedgrpc.v1.Coordinator over a RoundCoordinator, on grpc.aio.

The only module of fedgrpc.server that touches generated *_pb2 types. Its handlers hold only
the business of each call: fedgrpc.server.admission admits every call before its handler runs
(limits, credentials, the client id it acts as) and turns the errors a handler raises into
status codes (its docstring has the table); the two long-polls (GetGlobalWeights,
GetSecAggStage) wait through fedgrpc.server.longpoll. Every handler is a coroutine on one
event loop: a waiting long-poll or a silent stream costs memory, not a thread. Reads inside a
stream are bounded by the stall timeout, the wait for the in-flight budget by its own bound,
whatever deadline the client set.

The service is registered by hand rather than through the generated add_*_to_server so the
weight streams can use fedgrpc.common.wire's serializers: chunks written with one copy, and a
request parser that reports garbage instead of raising.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from fedgrpc.v1 import coordinator_pb2 as pb

from ..common import secagg as sa
from ..common import wire
from ..common.codec import DEFAULT_CHUNK_BYTES
from ..common.config import TaskRef
from ..common.errors import (
    CodecError,
    OverloadError,
    SecAggError,
    StalledError,
    TaskMismatchError,
    UpdateRejectedError,
)
from ..common.protocol import READY_FOR_CHUNKS_KEY, Instruction
from . import longpoll
from .admission import RULES, Admission, current_call
from .auth import Authenticator, CallContext
from .intake import InflightBudget, UpdateIntake
from .limits import CallCounter, Limits, next_message
from .monitor import Monitor
from .pacing import Paced, Pacer
from .refusals import RefusalLog
from .rounds import RoundAssignment, RoundCoordinator, UpdateHeader
from .secagg import SecAggRound
from .summary import EventSummary

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_MESSAGE_BYTES = 16 << 20  # one chunk (1 MiB by default) and its framing; larger gets RESOURCE_EXHAUSTED
DEFAULT_INFLIGHT_BYTES = 256 << 20
#: Tensors at least this big are decoded and prepared on a worker thread, so the event loop
#: keeps serving other calls meanwhile; smaller ones cost less than the hand-off.
OFFLOAD_BYTES = 256 << 10


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
        self._chunk_bytes = chunk_bytes
        self._inflight = inflight or InflightBudget(DEFAULT_INFLIGHT_BYTES)
        self._executor = executor
        self._long_polls = longpoll.LongPolls(self._limits.max_wait_s)
        self._pacer = Pacer(self._limits.checkin_rate, self._limits.max_wait_s)
        coordinator.watch_phase(self._pacer.phase)
        coordinator.on_pacing(self._pacer.away_s)
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
        #: The grpc.aio server interceptor that admits this service's calls.
        self.admission = Admission(
            wire.SERVICE,
            RULES,
            authenticator=authenticator or Authenticator(),
            limits=self._limits,
            num_clients=coordinator.run.num_clients,
            refusals=self.refusals,
            ended_early=self._ended_early,
        )

    def count_calls_gone(self) -> None:
        """From now until close_summaries: gRPC's own failure to answer a call its client has
        ended is not logged (the endpoint calls this when it starts serving)."""
        self.admission.count_calls_gone()

    def handler(self) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        """The fedgrpc.v1.Coordinator service, with the weight streams' own serializers; serve
        it with `admission` among the server's interceptors."""

        unary: dict[str, Any] = {  # method -> its request type
            "Join": pb.JoinRequest,
            "SubmitEvaluation": pb.EvaluationReport,
            "Withdraw": pb.WithdrawRequest,
            "AdvertiseKeys": pb.AdvertiseKeysRequest,
            "GetSecAggStage": pb.SecAggStageRequest,
            "ShareKeys": pb.ShareKeysRequest,
            "RevealShares": pb.RevealSharesRequest,
        }
        methods: dict[str, grpc.RpcMethodHandler] = {  # type: ignore[type-arg]
            name: grpc.unary_unary_rpc_method_handler(
                getattr(self, name), request_deserializer=request.FromString, response_serializer=_serialize
            )
            for name, request in unary.items()
        }
        methods["GetGlobalWeights"] = grpc.unary_stream_rpc_method_handler(
            self.GetGlobalWeights,
            request_deserializer=pb.GetGlobalWeightsRequest.FromString,
            response_serializer=wire.serialize,
        )
        methods["SubmitUpdate"] = grpc.stream_unary_rpc_method_handler(
            self.SubmitUpdate, request_deserializer=wire.parse_update_message, response_serializer=_serialize
        )
        return grpc.method_handlers_generic_handler(wire.SERVICE, methods)

    @property
    def open_calls(self) -> CallCounter:
        """Every call being served, counted by peer address."""
        return self.admission.open_calls

    def phase_changed(self) -> None:
        """On the loop: wake every waiting long-poll (see RoundCoordinator.on_phase_change)."""
        self._long_polls.phase_changed()

    def close_summaries(self) -> None:
        """The server is stopping: log the counts not yet reported; calls it cancels itself from
        now on are not counted as ended by their client."""
        self.admission.stop_counting()
        self.joins.flush()
        self.ended_early.flush()

    def _ended_early(self) -> None:
        self.ended_early.event("")
        self.monitor.call_ended_early()

    # -- RPCs ----------------------------------------------------------------------

    async def Join(self, request: pb.JoinRequest, context: CallContext) -> pb.JoinReply:
        self._coordinator.check_client(request.client_id)
        if request.spec_only:  # a site agent reading the run's spec: no join to record or log
            return pb.JoinReply(
                run=wire.run_to_pb(self._coordinator.run), current_round=self._coordinator.current_round
            )
        self._check_task(request.client_id, wire.task_from_pb(request.task))
        address = current_call().address
        if request.client_id in self._joined:  # back after a crash or a restart: always worth a line
            self.joins.event("client %d joined again from %s", request.client_id, address, always=True)
        else:
            self._joined.add(request.client_id)  # ids the run enrols (check_client): bounded
            self.joins.event("client %d joined from %s", request.client_id, address)
        self.monitor.client_joined(request.client_id, address)
        return pb.JoinReply(
            run=wire.run_to_pb(self._coordinator.run), current_round=self._coordinator.current_round
        )

    async def GetGlobalWeights(self, request: pb.GetGlobalWeightsRequest, context: CallContext) -> None:
        client, coordinator = request.client_id, self._coordinator
        coordinator.check_client(client)
        paced = request.accepts_retry_after
        task: RoundAssignment | Paced | None = await self._long_polls.until(
            lambda: self._look(client, request.after_round, paced), request.max_wait_ms, context
        )
        if task is None:
            task = RoundAssignment(Instruction.WAIT, coordinator.current_round)
        await self._send_task(client, task, context)

    def _look(self, client: int, after_round: int, paced: bool) -> RoundAssignment | Paced | None:
        """Work for the client; else, for a client that takes a retry-after and is not needed
        now, when to come back (fedgrpc.server.pacing); else None: hold its long-poll."""
        coordinator = self._coordinator
        task = coordinator.poll_task(client, after_round)
        if task is not None or not paced or coordinator.needs(client):
            return task
        return self._pacer.retry_after(client, coordinator.current_round, coordinator.ready_clients)

    async def SubmitEvaluation(
        self, request: pb.EvaluationReport, context: CallContext
    ) -> pb.SubmitEvaluationReply:
        received, expected = self._coordinator.submit_evaluation(
            request.client_id, request.round, request.num_examples, dict(request.metrics)
        )
        self.monitor.evaluation_reported(request.client_id, request.round)
        return pb.SubmitEvaluationReply(round=request.round, received=received, expected=expected)

    async def Withdraw(self, request: pb.WithdrawRequest, context: CallContext) -> pb.WithdrawReply:
        reason = wire.checked_text(request.reason, "WithdrawRequest.reason", wire.MAX_REASON)
        new = self._coordinator.withdraw(request.client_id, reason)
        address = current_call().address
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

    async def _send_task(self, client: int, task: RoundAssignment | Paced, context: CallContext) -> None:
        run_id = self._coordinator.run.run_id
        if isinstance(task, Paced):
            header = pb.WeightsHeader(
                instruction=pb.WAIT,
                round=task.round,
                run_id=run_id,
                retry_after_ms=max(1, round(task.retry_after_s * 1000)),
            )
            await self._write(context, pb.WeightsMessage(header=header))
            self.monitor.waiting(client)
            return
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
            settings=task.settings,
            extras=task.extras,
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
        messages = aiter(request_iterator)
        first = await next_message(messages, self._limits.stall_timeout_s, "the update's header")
        if not isinstance(first, pb.UpdateMessage) or first.WhichOneof("part") != "header":
            raise UpdateRejectedError("an update stream must start with its header")
        header = first.header
        what = f"update of client {header.client_id} for round {header.round}"
        with self.admission.claim(header.client_id, "update streams", what=what):
            count, expected = await self._receive_update(header, first.ByteSize(), messages, context)
        log.debug("accepted %s (%d/%d)", what, count, expected)
        return pb.SubmitUpdateReply(round=header.round, received=count, expected=expected)

    # -- secure aggregation's steps ------------------------------------------------

    async def AdvertiseKeys(self, request: pb.AdvertiseKeysRequest, context: CallContext) -> pb.SecAggAck:
        async with self._secagg_step(request.client_id, request.round) as secure:
            secure.advertise(
                request.client_id, request.cipher_public_key, request.mask_public_key, request.commitment
            )
        return pb.SecAggAck(round=request.round)

    async def ShareKeys(self, request: pb.ShareKeysRequest, context: CallContext) -> pb.SecAggAck:
        async with self._secagg_step(request.client_id, request.round) as secure:
            ciphertexts = {s.client_id: s.ciphertext for s in request.shares}
            if len(ciphertexts) != len(request.shares):
                raise SecAggError("two ciphertexts for one neighbour")
            secure.share(request.client_id, ciphertexts, request.session)
        return pb.SecAggAck(round=request.round)

    async def RevealShares(self, request: pb.RevealSharesRequest, context: CallContext) -> pb.SecAggAck:
        async with self._secagg_step(request.client_id, request.round) as secure:
            shares = [
                (s.owner, wire.share_kind_from_pb(s.kind), sa.Share(s.index, s.value)) for s in request.shares
            ]
            secure.reveal(request.client_id, shares, request.session)
        return pb.SecAggAck(round=request.round)

    async def GetSecAggStage(self, request: pb.SecAggStageRequest, context: CallContext) -> pb.SecAggStage:
        async with self._secagg_step(request.client_id, request.round) as secure:
            step = wire.step_from_pb(request.step)
            view = await self._long_polls.until(
                lambda: secure.view(request.client_id, step), request.max_wait_ms, context
            )
        return wire.stage_to_pb(request.round, view or sa.Stage(sa.StageStatus.WAIT))

    @asynccontextmanager
    async def _secagg_step(self, client: int, round_number: int) -> AsyncIterator[SecAggRound]:
        """Hand over the SecAggRound of an admitted secure aggregation call's round, for a
        client of the run."""
        self._coordinator.check_client(client)
        yield self._coordinator.secure_round_of(round_number)

    # -- internals -----------------------------------------------------------------

    _time_left = staticmethod(longpoll.time_left)

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


def _serialize(reply: Any) -> bytes:
    return reply.SerializeToString()  # type: ignore[no-any-return]
