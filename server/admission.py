"""Admission of every fedgrpc.v1.Coordinator call, in one place: a grpc.aio server interceptor.

Each call of the service is admitted in this order, before its handler may wait for anything:

    1. named for refusal lines: from its request (a unary call, by its `Rule`), else by its
       method until its handler has read whom it is from ("SubmitUpdate")
    2. the per-address limit             RESOURCE_EXHAUSTED   (Limits.per_peer)
    3. credentials from the metadata     UNAUTHENTICATED      (token, or certificate under mTLS)
    4. the client id it claims           PERMISSION_DENIED    (another client's id than the one
                                                              proven; a unary call's id is its
                                                              request's, a stream's its header's)
    5. the client's own limit            RESOURCE_EXHAUSTED   (Limits.max_calls_per_client, per
                                                              kind: long-polls, update streams)

Steps 4 and 5 need the request: for a unary call the interceptor takes them, for the update
stream its handler does once the header is read (`Admission.claim`, the same helper). The
overall limit is gRPC's own (`maximum_concurrent_rpcs`: RESOURCE_EXHAUSTED). Calls of other
services (health, reflection) pass untouched. Per method (`RULES`):

    Join, SubmitEvaluation, Withdraw    steps 1-4
    GetGlobalWeights, AdvertiseKeys,    steps 1-5, the client's long-polls limit
    GetSecAggStage, ShareKeys,
    RevealShares
    SubmitUpdate                        steps 2-3 before any message is read; 1, 4, 5 (its update
                                        streams limit) once the header is read

The handler keeps only the business of the call; whatever fedgrpc error it raises becomes the
call's status here, with one refusal line (fedgrpc.server.refusals, rate-limited):

    AuthError               UNAUTHENTICATED, or PERMISSION_DENIED for another client's id
    NotEnrolledError        NOT_FOUND
    StaleRoundError         FAILED_PRECONDITION (the message names the open round)
    TaskMismatchError       FAILED_PRECONDITION (at Join: the client's task is not the run's)
    UpdateRejectedError     its own code (INVALID_ARGUMENT, ALREADY_EXISTS, UNAVAILABLE, ...)
    CodecError              INVALID_ARGUMENT (also for a stream message that does not parse)
    SecAggError             INVALID_ARGUMENT (a secure aggregation message that cannot be used)
    OverloadError           RESOURCE_EXHAUSTED (a limit of fedgrpc.server.limits), or UNAVAILABLE
    StalledError            DEADLINE_EXCEEDED (the stream sent nothing for the stall timeout)
    any other FedGrpcError  INTERNAL

A call its client ends first (cancelled, past its deadline, or its connection closed) ends
quietly: gRPC cancels its handler, or a write to it fails; either is counted (`ended_early`),
never a traceback. A failure of gRPC's on a call its client has not ended is an error, and
logged as one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, NoReturn
from urllib.parse import unquote

import grpc

from ..common.errors import (
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
from .auth import Authenticator, CallContext
from .limits import CallCounter, Limits
from .refusals import RefusalLog

__all__ = ["RULES", "Admission", "Call", "Kind", "Rule", "current_call", "peer_address", "status_of"]

log = logging.getLogger(__name__)
_GRPC_LOG = logging.getLogger("grpc._cython.cygrpc")  # where gRPC logs its own failures

#: The kinds of call a client may hold at most Limits.max_calls_per_client of each.
Kind = Literal["long-polls", "update streams"]
Behavior = Callable[[Any, CallContext], Awaitable[Any]]


@dataclass(frozen=True)
class Rule:
    """How one method's calls are admitted beyond the address and credentials.

    `claim` reads a unary request: the call's name in refusal lines and the client id it acts
    as. None for a request stream, whose handler claims its id itself (`Admission.claim`)."""

    claim: Callable[[Any], tuple[str, int]] | None = None
    kind: Kind | None = None  # the client's own limit holds the call, if set


@dataclass(slots=True)
class Call:
    """What admission knows of one call, for its handler and its refusal line."""

    address: str
    what: str
    client: int | None = None  # the id it acts as (a unary call's is its request's, unproven)
    proven: int | None = None  # the id its credentials proved; None without authentication


_CALL: ContextVar[Call] = ContextVar("fedgrpc_admitted_call")


def current_call() -> Call:
    """The call the running handler serves (set by the interceptor around the handler)."""
    return _CALL.get()


def peer_address(context: CallContext) -> str:
    """The peer's network address without its port: 'ipv4:10.0.0.7', 'ipv6:[::1]', 'unix:...'."""
    peer = unquote(context.peer() or "unknown")  # gRPC writes ipv6:%5B::1%5D:port
    address = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return address if address.isprintable() else ascii(address)  # it goes into log lines as is


def status_of(error: FedGrpcError) -> grpc.StatusCode:
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


def _claims(name: Callable[[Any], str], kind: Kind | None = None) -> Rule:
    """A unary call acting as its request's client_id, named `name(request)` in refusal lines."""
    return Rule(lambda request: (name(request), request.client_id), kind)


def _secagg_step_named(step: str) -> Rule:
    return _claims(lambda r: f"secure aggregation {step} of client {r.client_id}", "long-polls")


#: fedgrpc.v1.Coordinator's calls: how each is named and which of the client's own limits holds it.
RULES = {
    "Join": _claims(lambda r: f"Join of client {r.client_id}"),
    "GetGlobalWeights": _claims(lambda r: f"GetGlobalWeights of client {r.client_id}", "long-polls"),
    "SubmitEvaluation": _claims(lambda r: f"evaluation of client {r.client_id} for round {r.round}"),
    "Withdraw": _claims(lambda r: f"withdrawal of client {r.client_id}"),
    "SubmitUpdate": Rule(),  # a stream: its handler claims the client its header names
    "AdvertiseKeys": _secagg_step_named("keys"),
    "GetSecAggStage": _secagg_step_named("stage request"),
    "ShareKeys": _secagg_step_named("shares"),
    "RevealShares": _secagg_step_named("revealed shares"),
}


class Admission(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Admits the calls of `service` by `rules` (method name -> Rule); see the module docstring."""

    def __init__(
        self,
        service: str,
        rules: Mapping[str, Rule],
        *,
        authenticator: Authenticator,
        limits: Limits,
        num_clients: int,
        refusals: RefusalLog,
        ended_early: Callable[[], None],
    ) -> None:
        self._prefix = f"/{service}/"
        self._rules = rules
        self._auth = authenticator
        self._refusals = refusals
        self._ended_early = ended_early
        self.open_calls = CallCounter(limits.per_peer(num_clients), "address")
        self._per_client = {
            kind: CallCounter(limits.max_calls_per_client, "client")
            for kind in ("long-polls", "update streams")
        }
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # type: ignore[type-arg]  # one per method
        self._counting_ended = True
        self._grpc_log_filter = _CallGoneFilter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler  # another service's, or no such method (UNIMPLEMENTED)
        wrapped = self._wrapped.get(method)
        if wrapped is None:  # the service's methods only: a bounded table
            name = method[len(self._prefix) :]
            wrapped = self._wrapped[method] = _with_behavior(
                handler, self._admitting(name, self._rules.get(name, Rule()))
            )
        return wrapped

    def open_by_kind(self) -> dict[str, int]:
        """Calls being served now: long-polls, update streams, and the rest (Join, reports, the
        secure aggregation steps that do not wait, and calls not yet admitted)."""
        polls, streams = self._per_client["long-polls"].total, self._per_client["update streams"].total
        return {
            "long_poll": polls,
            "update_stream": streams,
            "other": max(0, self.open_calls.total - polls - streams),
        }

    @contextmanager
    def claim(self, client_id: int, kind: Kind | None = None, *, what: str | None = None) -> Iterator[None]:
        """The running call acts as `client_id`: refused unless its credentials proved that id,
        or past the client's own limit on calls of `kind`, held until the block ends. `what`
        renames the call in refusal lines (a stream, once its header names the client)."""
        call = current_call()
        if what is not None:
            call.what = what
        _acts_as(call, client_id)
        if kind is None:
            yield
            return
        with self._per_client[kind].hold(client_id):
            yield

    # -- calls ended by their client --------------------------------------------------

    def count_calls_gone(self) -> None:
        """From now until `stop_counting`: gRPC's own failure to answer a call its client has
        ended is not logged (the endpoint calls this when it starts serving)."""
        _GRPC_LOG.removeFilter(self._grpc_log_filter)  # a second start adds no second filter
        _GRPC_LOG.addFilter(self._grpc_log_filter)

    def stop_counting(self) -> None:
        """The server is stopping: calls it cancels itself from now on are not counted as ended
        by their client."""
        self._counting_ended = False
        _GRPC_LOG.removeFilter(self._grpc_log_filter)

    def _count_if_ended_early(self, context: CallContext) -> None:
        """Done callback: a call over with no status sent (context.done() false) was ended by
        its client; gRPC's server context never reports such a call as cancelled(), and a call
        that ended with an error status its client received is not one of them."""
        if not context.done() and self._counting_ended:
            self._ended_early()

    # -- one call ---------------------------------------------------------------------

    def _admitting(self, name: str, rule: Rule) -> Callable[[Behavior], Behavior]:
        def wrap(behavior: Behavior) -> Behavior:
            async def serve(request: Any, context: CallContext) -> Any:
                # Few objects per call, on purpose: what a held call keeps alive brings the next
                # full garbage collection closer, and with TensorFlow loaded one stalls the loop
                # (0.9 s measured among test_hardening's 1,200 held streams, on 2 busy cores).
                context.add_done_callback(self._count_if_ended_early)  # type: ignore[arg-type]  # stubs: a class
                call, claimed = Call(peer_address(context), name), None
                if rule.claim is not None:  # a unary call: whom it acts as is in its request
                    call.what, claimed = rule.claim(request)
                    call.client = claimed
                _CALL.set(call)  # in the call's own task, whose context ends with it
                try:
                    try:
                        with self.open_calls.hold(call.address):
                            call.proven = self._auth.identify(context)  # before any message is awaited
                            if claimed is None:
                                return await behavior(request, context)
                            _acts_as(call, claimed)
                            if rule.kind is None:
                                return await behavior(request, context)
                            with self._per_client[rule.kind].hold(claimed):
                                return await behavior(request, context)
                    except FedGrpcError as error:
                        await self._refuse(context, call, error)
                except grpc.aio.InternalError as exc:
                    if not _is_batch_error(type(exc)):
                        raise  # a fault of its own, not a client gone: gRPC logs it and answers UNKNOWN
                    # A send or receive on the call failed: its client has gone. gRPC ends a
                    # cancelled handler quietly; the done callback counts the call if it is so.
                    raise asyncio.CancelledError from None

            return serve

        return wrap

    async def _refuse(self, context: CallContext, call: Call, error: FedGrpcError) -> NoReturn:
        code = status_of(error)
        self._refusals.refused(call.address, code.name, call.what, str(error), call.client)
        await context.abort(code, str(error))
        raise AssertionError("unreachable: context.abort raises")


def _acts_as(call: Call, client_id: int) -> None:
    """Refuse a call whose credentials proved another client than `client_id` (PERMISSION_DENIED)."""
    Authenticator.require(call.proven, client_id)
    call.client = client_id


def _with_behavior(
    handler: grpc.RpcMethodHandler,  # type: ignore[type-arg]
    wrap: Callable[[Behavior], Behavior],
) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    """`handler` with its behavior (a coroutine function) wrapped; serializers as they were."""
    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    make, behavior = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        wrap(behavior),  # type: ignore[arg-type]
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _CallGoneFilter(logging.Filter):
    """Keeps gRPC's own traceback out of the log when it fails to send the reply or status of a
    call whose client already ended it (an ExecuteBatchError after the handler returned); the
    call is counted when it is done. Any other error of gRPC's is logged."""

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
