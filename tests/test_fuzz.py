"""Thousands of malformed and adversarial SubmitUpdate streams against a real server on 127.0.0.1.

Every example is a whole round: the fuzzed stream goes in, then an honest client's update, and
the round closes. The server must answer every stream with a status code and refuse every NaN
or infinite value, and the new global model must be the example-weighted mean of exactly the
updates it accepted: nothing of a refused stream may reach it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from fedgrpc.common import wire
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.server.limits import Limits
from fedgrpc.server.rounds import RoundCoordinator
from fedgrpc.server.strategy import FedAvg
from fedgrpc.v1 import coordinator_pb2 as pb
from fedgrpc.v1 import coordinator_pb2_grpc as pb_grpc
from helpers import serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SPECS = [TensorSpec("w", "float32", (4, 3)), TensorSpec("b", "float32", (3,))]
GLOBAL = [np.ones((4, 3), np.float32), np.zeros(3, np.float32)]
FUZZ_CLIENTS = [1, 2]  # client 3 is kept out of the fuzz: its honest update goes in every round
HONEST = 3
REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
}
Update = tuple[list[np.ndarray], int]  # arrays, num_examples


@dataclass
class Served:
    """The server under fuzz and the global model its rounds have reached."""

    coordinator: RoundCoordinator
    channel: grpc.Channel
    weights: list[np.ndarray] = field(default_factory=lambda: list(GLOBAL))
    rounds: Iterator[int] = field(default_factory=lambda: itertools.count(1))


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=3), SPECS, FedAvg(), max_examples=1000)
    for client in (1, 2, 3):
        coordinator.next_task(client, after_round=0, timeout=0)
    with serving(coordinator, limits=Limits(max_wait_s=1)) as endpoint:
        channel = grpc.insecure_channel(f"127.0.0.1:{endpoint.port}")
        yield Served(coordinator, channel)
        channel.close()


def update_messages(
    client: int, round_number: int, arrays: Sequence[np.ndarray], num_examples: int = 10
) -> list[pb.UpdateMessage]:
    stream = wire.update_stream(
        client_id=client,
        round_number=round_number,
        num_examples=num_examples,
        metrics={"loss": 1.0},
        specs=SPECS,
        arrays=arrays,
        chunk_bytes=16,
    )
    return [m if isinstance(m, pb.UpdateMessage) else pb.UpdateMessage.FromString(m) for m in stream]


def submit(channel: grpc.Channel, messages: Sequence[pb.UpdateMessage]) -> grpc.StatusCode:
    """OK, or the status the stream was refused with (a refusal must say why)."""
    try:
        pb_grpc.CoordinatorStub(channel).SubmitUpdate(iter(messages), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in REFUSED, (exc.code(), exc.details())
        assert exc.details()
        return exc.code()
    return grpc.StatusCode.OK


def in_round(messages: Sequence[pb.UpdateMessage], number: int) -> list[pb.UpdateMessage]:
    """The fuzz names rounds relative to the open one: 1 is the open round, 2 the next."""
    moved = []
    for message in messages:
        if message.HasField("header") and message.header.round in (1, 2):
            copy = pb.UpdateMessage()
            copy.CopyFrom(message)
            copy.header.round = number + message.header.round - 1
            message = copy
        moved.append(message)
    return moved


def plain_update(messages: Sequence[pb.UpdateMessage]) -> Update | None:
    """What a stream carries if it is one uncompressed update in the expected layout: a header
    with our specs, then chunks that cover every tensor's bytes exactly once; else None."""
    if not messages or not messages[0].HasField("header"):
        return None
    header = messages[0].header
    if [wire.spec_from_pb(s) for s in header.tensors] != SPECS or header.compression:
        return None
    buffers = [bytearray(s.nbytes) for s in SPECS]
    covered = [np.zeros(s.nbytes, bool) for s in SPECS]
    for message in messages[1:]:
        if not message.HasField("chunk"):
            return None
        index, offset, data = message.chunk.tensor_index, message.chunk.offset, message.chunk.data
        if index >= len(SPECS) or offset + len(data) > SPECS[index].nbytes:
            return None
        if covered[index][offset : offset + len(data)].any():
            return None
        buffers[index][offset : offset + len(data)] = data
        covered[index][offset : offset + len(data)] = True
    if not all(c.all() for c in covered):
        return None
    arrays = [
        np.frombuffer(bytes(b), "<f4").reshape(s.shape).copy() for b, s in zip(buffers, SPECS, strict=True)
    ]
    return arrays, header.num_examples


def mean_of(updates: Sequence[Update]) -> list[np.ndarray]:
    """FedAvg's definition, written out: sum(n_k w_k) / sum(n_k) in float64."""
    total = sum(n for _, n in updates)
    sums = [np.zeros(s.shape, np.float64) for s in SPECS]
    for arrays, n in updates:
        for total_of, array in zip(sums, arrays, strict=True):
            total_of += n * array.astype(np.float64)
    return [s / total for s in sums]


def one_round(served: Served, fuzz: list[pb.UpdateMessage], *, may_count: bool) -> grpc.StatusCode:
    """Open a round, send the fuzzed stream, an honest update from client 3, close the round and
    check the new global weights against the definition (the weighted mean of what was accepted).
    `may_count`: the stream may be accepted if it is a well-formed finite update."""
    coordinator, number = served.coordinator, next(served.rounds)
    coordinator.open_round(number, served.weights)
    status = submit(served.channel, in_round(fuzz, number))
    counted: list[Update] = []
    if status == grpc.StatusCode.OK:
        carried = plain_update(in_round(fuzz, number))
        assert may_count and carried is not None, "the server accepted a stream it must refuse"
        assert all(np.isfinite(a).all() for a in carried[0]), "the server accepted NaN or infinity"
        counted.append(carried)
    rng = np.random.default_rng(number)
    honest = [(w + rng.normal(0, 0.1, w.shape)).astype(np.float32) for w in served.weights]
    assert submit(served.channel, update_messages(HONEST, number, honest, 7)) == grpc.StatusCode.OK
    counted.append((honest, 7))
    outcome = coordinator.close_round()
    assert len(outcome.updates) == len(counted)
    for got, want in zip(outcome.weights, mean_of(counted), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    served.weights = [np.asarray(w) for w in outcome.weights]
    return status


good_specs = st.just([wire.spec_to_pb(s) for s in SPECS])
any_spec = st.builds(
    pb.TensorSpec,
    name=st.sampled_from(["w", "b", "", "x" * 300]) | st.text(max_size=6),
    dtype=st.integers(0, 12),
    shape=st.lists(st.integers(-3, 6) | st.just(2**40), max_size=4),
)
header = st.builds(
    pb.UpdateHeader,
    client_id=st.sampled_from([0, 4, 2**32 - 1, *FUZZ_CLIENTS]),
    round=st.sampled_from([0, 1, 2, 2**32 - 1]),  # 1: the open round, 2: the next (see in_round)
    num_examples=st.sampled_from([0, 1, 10, 1001, 2**64 - 1]),
    metrics=st.dictionaries(st.text(max_size=4), st.floats(allow_nan=True, allow_infinity=True), max_size=3),
    tensors=good_specs | st.lists(any_spec, max_size=3),
)
chunk = st.builds(
    pb.TensorChunk,
    tensor_index=st.integers(0, 3) | st.just(2**32 - 1),
    offset=st.integers(0, 60) | st.just(2**63),
    data=st.binary(max_size=64),
)
message = st.one_of(st.builds(pb.UpdateMessage, header=header), st.builds(pb.UpdateMessage, chunk=chunk))


def poisoned_update(client: int, position: int, value: float, tensor: int) -> list[pb.UpdateMessage]:
    arrays = [w.copy() for w in GLOBAL]
    arrays[tensor].flat[position % arrays[tensor].size] = value
    return update_messages(client, 1, arrays)


adversarial = st.builds(
    poisoned_update,
    st.sampled_from(FUZZ_CLIENTS),
    st.integers(0, 11),
    st.sampled_from([np.nan, np.inf, -np.inf]),
    st.integers(0, 1),
)
truncated = update_messages(FUZZ_CLIENTS[0], 1, GLOBAL)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(message, max_size=8))
def test_malformed_updates_never_reach_the_model(served: Served, messages: list[pb.UpdateMessage]) -> None:
    one_round(served, messages, may_count=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=adversarial)
def test_nan_and_infinity_are_refused(served: Served, messages: list[pb.UpdateMessage]) -> None:
    assert one_round(served, messages, may_count=False) == grpc.StatusCode.INVALID_ARGUMENT


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=st.integers(0, len(truncated) - 1))
def test_truncated_updates_are_refused(served: Served, keep: int) -> None:
    assert one_round(served, truncated[:keep], may_count=False) != grpc.StatusCode.OK


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=256))
def test_random_bytes_get_a_status(served: Served, blob: bytes) -> None:
    raw = served.channel.stream_unary(
        "/fedgrpc.v1.Coordinator/SubmitUpdate", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as info:
        raw(iter([blob, blob]), timeout=10)
    # Garbage is the client's mistake, and the status says so: never INTERNAL or UNKNOWN.
    assert info.value.code() in {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }, (info.value.code(), info.value.details())


def test_oversized_messages_get_resource_exhausted(served: Served) -> None:
    big = pb.UpdateMessage(chunk=pb.TensorChunk(tensor_index=0, offset=0, data=b"\0" * (17 << 20)))
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.CoordinatorStub(served.channel).SubmitUpdate(iter([big]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_after_the_fuzz_every_client_still_gets_in(served: Served) -> None:
    """Whatever ran before (or nothing): a round of three valid updates closes at their mean."""
    coordinator, number = served.coordinator, next(served.rounds)
    coordinator.open_round(number, served.weights)
    rng = np.random.default_rng(0)
    updates = [
        ([(w + rng.normal(0, 1, w.shape)).astype(np.float32) for w in served.weights], n) for n in (3, 5, 9)
    ]
    for client, (arrays, n) in zip((1, 2, 3), updates, strict=True):
        assert submit(served.channel, update_messages(client, number, arrays, n)) == grpc.StatusCode.OK
    outcome = coordinator.close_round()
    assert [u.client_id for u in outcome.updates] == [1, 2, 3]
    for got, want in zip(outcome.weights, mean_of(updates), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
