"""The gRPC boundary with a real server on 127.0.0.1: status codes, streams, a model that does not change."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fedgrpc.client.connection import Connection
from fedgrpc.common import wire
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.common.errors import NotEnrolledError, RunFailedError, StaleRoundError, UpdateRejectedError
from fedgrpc.common.protocol import Instruction
from fedgrpc.server.limits import Limits
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.strategy import FedAvg
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc
from helpers import serving
from prometheus_client import generate_latest

# Bigger than gRPC's default 4 MB message limit, so only chunked streaming can carry it.
SPECS = [TensorSpec("dense/kernel", "float32", (1200, 1000)), TensorSpec("dense/bias", "float32", (1000,))]
GLOBAL = [np.random.default_rng(0).standard_normal(s.shape).astype(np.float32) for s in SPECS]


@contextlib.contextmanager
def serve_round(
    *, spool_dir: Path | None = None, compression: str = "none"
) -> Iterator[tuple[RoundCoordinator, str]]:
    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=2, compression=compression), SPECS, FedAvg())
    for client in (1, 2):  # ready before the round opens, as the server's driver waits for
        coordinator.next_task(client, after_round=0, timeout=0)
    coordinator.open_round(1, GLOBAL)
    with serving(coordinator, limits=Limits(max_wait_s=2), spool_dir=spool_dir) as endpoint:
        yield coordinator, f"127.0.0.1:{endpoint.port}"


@pytest.fixture
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[RoundCoordinator, str]]:
    """A server whose updates are staged in memory, or on disk with indirect param "disk"."""
    spool_dir = tmp_path if getattr(request, "param", "memory") == "disk" else None
    with serve_round(spool_dir=spool_dir) as served:
        yield served


def raw_submit(target: str, messages: list[pb.UpdateMessage]) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.CoordinatorStub(channel).SubmitUpdate(iter(messages), timeout=10)
    return info.value


def update(
    client: int = 1, round_number: int = 1, arrays: list[np.ndarray] | None = None, n: int = 5
) -> list[pb.UpdateMessage]:
    stream = wire.update_stream(
        client_id=client,
        round_number=round_number,
        num_examples=n,
        metrics={"loss": 0.5},
        specs=SPECS,
        arrays=arrays if arrays is not None else GLOBAL,
    )
    return [m if isinstance(m, pb.UpdateMessage) else pb.UpdateMessage.FromString(m) for m in stream]


@pytest.mark.parametrize("served", ["memory", "disk"], indirect=True)
def test_a_model_over_4mb_goes_down_and_up_exactly(served: tuple[RoundCoordinator, str]) -> None:
    coordinator, target = served
    with Connection(target, 1, connect_timeout_s=5) as connection:
        task = connection.next_task(after_round=0, max_wait_s=1)
        assert task.instruction is Instruction.TRAIN and task.round == 1
        for got, want in zip(task.weights, GLOBAL, strict=True):
            np.testing.assert_array_equal(got, want)
        assert connection.submit(1, SPECS, [w + 1 for w in GLOBAL], 10, {"loss": 1.0}) == (1, 2)
    with Connection(target, 2, connect_timeout_s=5) as connection:
        assert connection.submit(1, SPECS, [w + 4 for w in GLOBAL], 30, {}) == (2, 2)
    outcome = coordinator.close_round()
    np.testing.assert_allclose(outcome.weights[0], GLOBAL[0] + 3.25, atol=1e-5)  # (1*10 + 4*30) / 40
    np.testing.assert_allclose(outcome.weights[1], GLOBAL[1] + 3.25, atol=1e-5)


def test_unknown_client_is_refused_at_join(served: tuple[RoundCoordinator, str]) -> None:
    with (
        Connection(served[1], 7, connect_timeout_s=5) as connection,
        pytest.raises(NotEnrolledError, match="1..2"),
    ):
        connection.join()


def test_join_returns_the_run(served: tuple[RoundCoordinator, str]) -> None:
    with Connection(served[1], 2, connect_timeout_s=5) as connection:
        run, current = connection.join()
    assert (run.num_clients, run.rounds, current) == (2, 1, 1)


def test_long_poll_answers_wait_when_there_is_nothing_to_do(served: tuple[RoundCoordinator, str]) -> None:
    with Connection(served[1], 1, connect_timeout_s=5) as connection:
        connection.submit(1, SPECS, GLOBAL, 1, {})
        started = time.monotonic()
        task = connection.next_task(after_round=1, max_wait_s=0.3)
    assert task.instruction is Instruction.WAIT and task.round == 1
    assert time.monotonic() - started >= 0.3  # held by the server, not answered at once


def _chunks_only() -> list[pb.UpdateMessage]:
    return update()[1:]


def _truncated() -> list[pb.UpdateMessage]:
    return update()[:-1]


def _extra_chunk() -> list[pb.UpdateMessage]:
    messages = update()
    return messages + [pb.UpdateMessage(chunk=pb.TensorChunk(tensor_index=1, offset=4000, data=b"\0" * 4))]


def _gap() -> list[pb.UpdateMessage]:
    messages = update()
    messages[2].chunk.offset += 8
    return messages


def _two_headers() -> list[pb.UpdateMessage]:
    messages = update()
    return messages[:2] + messages[:1] + messages[2:]


def _nan() -> list[pb.UpdateMessage]:
    poisoned = [w.copy() for w in GLOBAL]
    poisoned[1][7] = np.nan
    return update(arrays=poisoned)


def _bad_dtype_code() -> list[pb.UpdateMessage]:
    messages = update()
    messages[0].header.tensors[0].dtype = 99  # type: ignore[assignment]  # no such DType
    return messages


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (_chunks_only, grpc.StatusCode.INVALID_ARGUMENT, "must start with its header"),
        (_truncated, grpc.StatusCode.INVALID_ARGUMENT, "incomplete"),
        (_extra_chunk, grpc.StatusCode.INVALID_ARGUMENT, "overflows"),
        (_gap, grpc.StatusCode.INVALID_ARGUMENT, "expected"),
        (_two_headers, grpc.StatusCode.INVALID_ARGUMENT, "only tensor chunks"),
        (_nan, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (_bad_dtype_code, grpc.StatusCode.INVALID_ARGUMENT, "unknown dtype"),
        (lambda: update(client=9), grpc.StatusCode.NOT_FOUND, "not part of this run"),
        (lambda: update(round_number=3), grpc.StatusCode.FAILED_PRECONDITION, "open round: 1"),
        (lambda: update(n=0), grpc.StatusCode.INVALID_ARGUMENT, "positive"),
    ],
    ids=[
        "no-header",
        "truncated",
        "extra-bytes",
        "gap",
        "two-headers",
        "nan",
        "dtype",
        "unknown-id",
        "stale",
        "zero-n",
    ],
)
def test_malformed_updates_get_a_status_and_change_nothing(
    served: tuple[RoundCoordinator, str],
    make: Callable[[], list[pb.UpdateMessage]],
    code: grpc.StatusCode,
    message: str,
) -> None:
    coordinator, target = served
    error = raw_submit(target, make())
    assert error.code() == code
    assert message in (error.details() or "")
    # the round still takes two good updates and averages exactly them
    with Connection(target, 1, connect_timeout_s=5) as one, Connection(target, 2, connect_timeout_s=5) as two:
        one.submit(1, SPECS, GLOBAL, 1, {})
        assert two.submit(1, SPECS, GLOBAL, 1, {}) == (2, 2)
    np.testing.assert_array_equal(coordinator.close_round().weights[0], GLOBAL[0])


def test_client_errors_map_back_to_fedgrpc_errors(served: tuple[RoundCoordinator, str]) -> None:
    with Connection(served[1], 1, connect_timeout_s=5) as connection:
        connection.submit(1, SPECS, GLOBAL, 1, {})
        with pytest.raises(UpdateRejectedError, match="already submitted") as info:
            connection.submit(1, SPECS, GLOBAL, 1, {})
        assert info.value.code == "ALREADY_EXISTS"
        with pytest.raises(StaleRoundError):
            connection.submit(2, SPECS, GLOBAL, 1, {})


@pytest.mark.parametrize("served", ["memory", "disk"], indirect=True)
def test_a_stream_that_breaks_off_leaves_the_sum_untouched(
    served: tuple[RoundCoordinator, str], tmp_path: Path
) -> None:
    coordinator, target = served
    poisoned = update(arrays=[w + 1000 for w in GLOBAL])  # would wreck the mean if any of it counted

    def breaks_off() -> Iterator[pb.UpdateMessage]:
        yield from poisoned[:4]  # the header and a few megabytes of chunks
        raise ConnectionError("the client's process died mid-update")

    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.CoordinatorStub(channel).SubmitUpdate(breaks_off(), timeout=10)
    assert info.value.code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
    assert coordinator.received == 0
    with Connection(target, 1, connect_timeout_s=5) as one, Connection(target, 2, connect_timeout_s=5) as two:
        one.submit(1, SPECS, [w + 1 for w in GLOBAL], 3, {})  # the broken client, trying again
        two.submit(1, SPECS, GLOBAL, 1, {})
    weights = coordinator.close_round().weights
    np.testing.assert_allclose(weights[0], GLOBAL[0] + 0.75, atol=1e-6)  # (3*1 + 1*0) / 4
    assert not spool_files_open(tmp_path)  # the broken stream's and the folded updates' files are gone


def spool_files_open(directory: Path) -> list[str]:
    """Files of this process under `directory`, open or deleted-but-open."""
    links = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return [link for link in links if link.startswith(str(directory))]


@pytest.mark.parametrize("method", ["fp16", "int8"])
def test_compressed_updates_are_rebuilt_from_the_round_weights(method: str) -> None:
    with serve_round(compression=method) as (coordinator, target):
        with Connection(target, 1, connect_timeout_s=5) as other, pytest.raises(UpdateRejectedError) as info:
            other.submit(1, SPECS, GLOBAL, 1, {}, method="none")  # not how this run's updates travel
        assert info.value.code == "INVALID_ARGUMENT"
        assert f"travel with compression {method!r} (RunSpec.compression), not 'none'" in str(info.value)
        assert coordinator.received == 0
        check_compressed_round(coordinator, target, method)


def check_compressed_round(coordinator: RoundCoordinator, target: str, method: str) -> None:
    rng = np.random.default_rng(3)
    updates = [[w + rng.standard_normal(w.shape).astype(np.float32) * 0.01 for w in GLOBAL] for _ in range(2)]
    with Connection(target, 1, connect_timeout_s=5) as one, Connection(target, 2, connect_timeout_s=5) as two:
        for connection, update_weights, n in ((one, updates[0], 10), (two, updates[1], 30)):
            task = connection.next_task(after_round=0, max_wait_s=1)
            connection.submit(1, SPECS, update_weights, n, {}, method=method, reference=task.weights)
    got = coordinator.close_round().weights
    for i, spec in enumerate(SPECS):
        want = (updates[0][i] * 10 + updates[1][i] * 30) / 40
        largest = max(float(np.abs(u[i] - GLOBAL[i]).max()) for u in updates)
        bound = largest * (1 / 254 if method == "int8" else 2.0**-11) + 1e-6
        np.testing.assert_allclose(got[i], want, rtol=0, atol=bound, err_msg=spec.name)


@pytest.mark.parametrize("served", ["disk"], indirect=True)
def test_an_update_that_cannot_be_staged_on_disk_is_refused_as_unavailable(
    served: tuple[RoundCoordinator, str], tmp_path: Path
) -> None:
    coordinator, target = served
    tmp_path.rmdir()  # the spool directory is gone (a disk unmounted, a cleaner too eager)
    error = raw_submit(target, update())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "could not stage this update on disk" in (error.details() or "")
    assert coordinator.received == 0


def _join(target: str, task: pb.TaskRef) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.CoordinatorStub(channel).Join(pb.JoinRequest(client_id=1, task=task), timeout=10)
    return info.value


FORGED = "2026-01-01 00:00:00 INFO fedgrpc.server: round 9/9 finished"


@pytest.mark.parametrize(
    "digest",
    ["ab\n" + FORGED, "z" * 64, "AB" * 32, "ab" * 31],
    ids=["newline", "not-hex", "upper-case", "too-short"],
)
def test_a_task_digest_that_is_not_hex_is_refused_and_forges_no_log_line(
    served: tuple[RoundCoordinator, str], digest: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG"):
        error = _join(served[1], pb.TaskRef(name="cifar10", digest=digest))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "TaskRef.digest" in (error.details() or "") and "64 lower-case hex digits" in (
        error.details() or ""
    )
    lines = [line for record in caplog.records for line in record.getMessage().splitlines()[1:]]
    assert not lines, f"a log message spans several lines: {lines}"
    assert not any(record.getMessage().startswith(FORGED[:10]) for record in caplog.records)


def test_a_task_name_with_control_characters_is_refused(
    served: tuple[RoundCoordinator, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG"):
        error = _join(served[1], pb.TaskRef(name="cifar10\n" + FORGED, digest="ab" * 32))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "TaskRef.name" in (error.details() or "")
    assert not any("\n" in record.getMessage() for record in caplog.records)


def test_a_retry_of_a_counted_update_after_its_round_closed_is_already_exists(
    served: tuple[RoundCoordinator, str],
) -> None:
    coordinator, target = served
    with Connection(target, 1, connect_timeout_s=5) as one:
        assert one.submit(1, SPECS, GLOBAL, 1, {}) == (1, 2)
    coordinator.close_round()  # client 2 never sent one: round 1 closes with client 1's alone
    for code, stream in ((grpc.StatusCode.ALREADY_EXISTS, update(client=1)), (None, update(client=2))):
        error = raw_submit(target, stream)
        assert error.code() == (code or grpc.StatusCode.FAILED_PRECONDITION), error.details()
    coordinator.open_round(2, GLOBAL)  # round 1 is now behind: the retry is still recognised
    assert raw_submit(target, update(client=1)).code() == grpc.StatusCode.ALREADY_EXISTS
    assert raw_submit(target, update(client=2)).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert coordinator.received == 0  # round 2 counted none of them


def test_a_withdrawal_is_logged_once_recorded_and_checked(
    served: tuple[RoundCoordinator, str], caplog: pytest.LogCaptureFixture
) -> None:
    coordinator, target = served
    with grpc.insecure_channel(target) as channel:
        withdraw = pb_grpc.CoordinatorStub(channel).Withdraw
        for reason in ("", "bad\ndata", "x" * 501):
            with pytest.raises(grpc.RpcError) as info:
                withdraw(pb.WithdrawRequest(client_id=2, reason=reason), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            withdraw(pb.WithdrawRequest(client_id=9, reason="no data"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert coordinator.withdrawals == {} and coordinator.expected == 2
        with caplog.at_level("INFO"):
            for _ in range(3):
                withdraw(
                    pb.WithdrawRequest(client_id=2, reason="its data does not fit the model"), timeout=10
                )
    said = [r.getMessage() for r in caplog.records if "cannot take part" in r.getMessage()]
    assert said == [
        "client 2 cannot take part: its data does not fit the model. The run goes on without it if "
        "--min-clients allows"
    ]
    assert coordinator.withdrawals == {2: "its data does not fit the model"}
    assert coordinator.expected == 1  # the open round no longer waits for it
    assert coordinator.wait_all_ready(timeout=1)
    with Connection(target, 2, connect_timeout_s=5) as two:
        two.next_task(after_round=0, max_wait_s=0.1)  # asking again: it takes part again
    assert coordinator.expected == 2


def test_withdrawals_cannot_flood_the_log_and_are_not_counted_as_refusals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that alternates two reasons, or withdraws between polls (each reason new
    again), gets one line a minute; every withdrawal is counted, apart from the refusals."""
    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=2), SPECS, FedAvg())
    for client in (1, 2):
        coordinator.next_task(client, after_round=0, timeout=0)
    coordinator.open_round(1, GLOBAL)
    with serving(coordinator, limits=Limits(max_wait_s=2)) as endpoint:
        target = f"127.0.0.1:{endpoint.port}"
        with grpc.insecure_channel(target) as channel, caplog.at_level("INFO"):
            withdraw = pb_grpc.CoordinatorStub(channel).Withdraw
            for k in range(40):
                withdraw(pb.WithdrawRequest(client_id=2, reason=f"reason {k % 2}"), timeout=10)
            for _ in range(3):
                with Connection(target, 2, connect_timeout_s=5) as two:
                    two.next_task(after_round=0, max_wait_s=0.1)  # takes part again ...
                withdraw(pb.WithdrawRequest(client_id=2, reason="reason 0"), timeout=10)  # ... and not
        metrics = generate_latest(endpoint.monitor.registry).decode()
        state = endpoint.monitor.snapshot()
    said = [r.getMessage() for r in caplog.records if "cannot take part" in r.getMessage()]
    assert said == [
        "client 2 cannot take part: reason 0. The run goes on without it if --min-clients allows"
    ], said
    assert coordinator.withdrawals == {2: "reason 0"}
    assert "fedgrpc_withdrawals_total 43.0" in metrics, metrics
    assert "WITHDRAWN" not in metrics and 'fedgrpc_refusals_total{code="' not in metrics, metrics
    assert state["refusals"]["recent"] == [] and state["refusals"]["by_code"] == {}
    assert state["withdrawals"]["recent"][0]["reason"] == "reason 0"


def test_a_message_over_16_mib_is_resource_exhausted(served: tuple[RoundCoordinator, str]) -> None:
    coordinator, target = served
    huge = pb.UpdateMessage(chunk=pb.TensorChunk(tensor_index=0, offset=0, data=bytes(17 << 20)))
    error = raw_submit(target, [*update()[:1], huge])
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert coordinator.received == 0


def test_the_open_round_stops_waiting_for_a_client_that_withdraws(
    served: tuple[RoundCoordinator, str],
) -> None:
    coordinator, target = served
    with Connection(target, 1, connect_timeout_s=5) as one:
        one.submit(1, SPECS, GLOBAL, 1, {})
    assert not coordinator.wait_for_everyone(timeout=0.1)  # client 2 is still expected
    with Connection(target, 2, connect_timeout_s=5) as two:
        assert two.withdraw("the server's weights do not fit this script's model")
    assert coordinator.wait_for_everyone(timeout=10)
    assert coordinator.expected == 1


def test_withdrawals_mid_round_that_leave_fewer_than_min_clients_stop_the_run(tmp_path: Path) -> None:
    from fedgrpc.server.driver import wait_to_close

    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=3), SPECS, FedAvg(), min_clients=2)
    for client in (1, 2, 3):
        coordinator.next_task(client, after_round=0, timeout=0)
    coordinator.open_round(1, GLOBAL)
    outcome: list[object] = []

    def collect() -> None:  # the server's driver, without a round timeout
        try:
            outcome.append(wait_to_close(coordinator, None, 3, 1, 2))
        except RunFailedError as exc:
            outcome.append(exc)

    driver = threading.Thread(target=collect, daemon=True)
    driver.start()
    with serving(coordinator, host="127.0.0.1", port=0) as endpoint:
        target = f"127.0.0.1:{endpoint.port}"
        with Connection(target, 1, connect_timeout_s=5) as one:
            one.submit(1, SPECS, GLOBAL, 1, {})
        with grpc.insecure_channel(target) as channel:
            withdraw = pb_grpc.CoordinatorStub(channel).Withdraw
            withdraw(pb.WithdrawRequest(client_id=2, reason="its data does not fit the model"), timeout=10)
            withdraw(pb.WithdrawRequest(client_id=3, reason="no data"), timeout=10)
        driver.join(timeout=60)
    assert outcome, "the driver still waits for updates that cannot come"
    assert isinstance(outcome[0], RunFailedError), outcome
    assert "--min-clients 2" in str(outcome[0]) and "client 3: no data" in str(outcome[0])


def test_both_connections_refuse_an_instruction_they_do_not_know() -> None:
    """A newer server's instruction is an error that says so, not a WAIT to poll on for ever."""
    import asyncio

    from fedgrpc.client.aio_connection import AioConnection

    async def weights(request: pb.GetGlobalWeightsRequest, context: object) -> object:
        yield pb.WeightsMessage(header=pb.WeightsHeader(instruction=9, round=1))  # type: ignore[arg-type]

    async def run() -> list[str]:
        server = grpc.aio.server()
        handler = grpc.unary_stream_rpc_method_handler(
            weights,
            request_deserializer=pb.GetGlobalWeightsRequest.FromString,
            response_serializer=pb.WeightsMessage.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(wire.SERVICE, {"GetGlobalWeights": handler}),)
        )
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        said = []
        try:
            async with AioConnection(target, 1, connect_timeout_s=5) as aio:
                with pytest.raises(UpdateRejectedError, match="instruction 9") as caught:
                    await aio.next_task(0, max_wait_s=1)
                said.append(str(caught.value))
            with Connection(target, 1, connect_timeout_s=5) as blocking:
                with pytest.raises(UpdateRejectedError, match="instruction 9") as caught:
                    await asyncio.to_thread(blocking.next_task, 0, 1)
                said.append(str(caught.value))
        finally:
            await server.stop(0)
        return said

    said = asyncio.run(asyncio.wait_for(run(), 60))
    assert said[0] == said[1] and "does not know" in said[0]


def test_a_fault_in_a_handler_is_logged_not_counted_as_a_call_its_client_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a call its client really ended is counted as such; gRPC's InternalError for any other
    reason reaches the log (with the call-gone filter on) and the client gets an error status."""
    import asyncio
    import logging

    from fedgrpc.server.servicer import CoordinatorServicer

    servicer = CoordinatorServicer(RoundCoordinator(RunSpec(rounds=1, num_clients=2), SPECS, FedAvg()))

    async def broken(request: pb.JoinRequest, context: object) -> pb.JoinReply:
        raise grpc.aio.InternalError("a fault of the server's own")

    async def run() -> grpc.StatusCode:
        server = grpc.aio.server(interceptors=(servicer.admission,))
        handler = grpc.unary_unary_rpc_method_handler(
            broken,
            request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinReply.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(wire.SERVICE, {"Join": handler}),)
        )
        target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Join(pb.JoinRequest(client_id=1), timeout=30)
                return caught.value.code()
        finally:
            await server.stop(0)

    servicer.count_calls_gone()
    try:
        with caplog.at_level(logging.ERROR, logger="grpc"):
            code = asyncio.run(asyncio.wait_for(run(), 60))
    finally:
        servicer.close_summaries()
    assert code == grpc.StatusCode.UNKNOWN
    assert servicer.ended_early.total == 0
    errors = [r.exc_info[0] for r in caplog.records if r.exc_info and r.exc_info[0] is not None]
    assert any(issubclass(e, grpc.aio.InternalError) for e in errors), caplog.text


def test_the_call_gone_filter_is_on_grpcs_log_once_and_only_while_an_endpoint_serves() -> None:
    """Servicers made in a process do not pile filters onto gRPC's (process-wide) logger."""
    import logging

    from fedgrpc.server.servicer import CoordinatorServicer

    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    before = len(grpc_log.filters)
    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=2), SPECS, FedAvg())
    for _ in range(3):
        CoordinatorServicer(coordinator)
    assert len(grpc_log.filters) == before
    with serving(coordinator) as endpoint:
        endpoint.servicer.count_calls_gone()  # again: still one
        assert len(grpc_log.filters) == before + 1
    assert len(grpc_log.filters) == before


def test_a_client_that_joins_again_gets_a_line_of_its_own(
    served: tuple[RoundCoordinator, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A client back after a crash is news whatever joined before it: never only a count."""
    import logging

    with caplog.at_level(logging.INFO, logger="fedgrpc.server.servicer"):
        for _ in range(2):
            with Connection(served[1], 2, connect_timeout_s=5) as connection:
                connection.join()
    lines = [r.getMessage() for r in caplog.records if r.name == "fedgrpc.server.servicer"]
    assert [line.split(" from ")[0] for line in lines if "client 2 joined" in line] == [
        "client 2 joined",
        "client 2 joined again",
    ], lines


def test_a_spec_only_join_reads_the_run_without_joining(
    served: tuple[RoundCoordinator, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A site agent reading which task a run names (JoinRequest.spec_only) gets the run's spec,
    but is neither logged nor recorded as joined: a real join after it is the first."""
    import logging

    with caplog.at_level(logging.INFO, logger="fedgrpc.server.servicer"):
        with Connection(served[1], 2, connect_timeout_s=5) as connection:
            for _ in range(3):
                run, current = connection.join(spec_only=True)
                assert (run.num_clients, run.rounds, current) == (2, 1, 1)
            connection.join()
        with Connection(served[1], 7, connect_timeout_s=5) as stranger, pytest.raises(NotEnrolledError):
            stranger.join(spec_only=True)  # still only the run's clients
    lines = [r.getMessage() for r in caplog.records if r.name == "fedgrpc.server.servicer"]
    assert [line.split(" from ")[0] for line in lines if "client 2 joined" in line] == ["client 2 joined"], (
        lines
    )
