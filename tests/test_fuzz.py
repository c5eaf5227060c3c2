"""Thousands of malformed and adversarial SubmitUpdate streams against a real server on 127.0.0.1.

The server must answer every one with a status code, stay up, keep the global model as it
was, and still accept a valid update afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from fedgrpc.common import wire
from fedgrpc.common.codec import TensorSpec
from fedgrpc.common.config import RunSpec
from fedgrpc.server.checkpoint import weights_digest
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
FUZZ_CLIENTS = [1, 2]  # client 3 is kept out of the fuzz, to show a valid update still gets in
SEEN: Counter[str] = Counter()


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[RoundCoordinator, grpc.Channel]]:
    coordinator = RoundCoordinator(RunSpec(rounds=1, num_clients=3), SPECS, FedAvg(), max_examples=1000)
    for client in (1, 2, 3):
        coordinator.next_task(client, after_round=0, timeout=0)
    coordinator.open_round(1, GLOBAL)
    with serving(coordinator, limits=Limits(max_wait_s=1)) as endpoint:
        channel = grpc.insecure_channel(f"127.0.0.1:{endpoint.port}")
        yield coordinator, channel
        channel.close()


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
    round=st.sampled_from([0, 1, 2, 2**32 - 1]),
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


def poisoned_update(client: int, position: int, value: float) -> list[pb.UpdateMessage]:
    arrays = [w.copy() for w in GLOBAL]
    arrays[0].flat[position % arrays[0].size] = value
    stream = wire.update_stream(
        client_id=client,
        round_number=1,
        num_examples=10,
        metrics={},
        specs=SPECS,
        arrays=arrays,
        chunk_bytes=16,
    )
    return [m if isinstance(m, pb.UpdateMessage) else pb.UpdateMessage.FromString(m) for m in stream]


adversarial = st.builds(
    poisoned_update,
    st.sampled_from(FUZZ_CLIENTS),
    st.integers(0, 11),
    st.sampled_from([np.nan, np.inf, -np.inf]),
)
truncated = adversarial.map(lambda ms: ms[:-1])
streams = st.lists(message, max_size=8) | adversarial | truncated


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=streams)
def test_malformed_updates_never_change_the_model(
    served: tuple[RoundCoordinator, grpc.Channel], messages: list[pb.UpdateMessage]
) -> None:
    coordinator, channel = served
    try:
        pb_grpc.CoordinatorStub(channel).SubmitUpdate(iter(messages), timeout=10)
        SEEN["OK"] += 1
    except grpc.RpcError as exc:
        assert exc.code() in {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.ALREADY_EXISTS,
        }, (exc.code(), exc.details())
        assert exc.details()
        SEEN[exc.code().name] += 1
    assert weights_digest(coordinator.global_weights) == weights_digest(GLOBAL)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=256))
def test_random_bytes_get_a_status(served: tuple[RoundCoordinator, grpc.Channel], blob: bytes) -> None:
    raw = served[1].stream_unary(
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
    SEEN[f"raw:{info.value.code().name}"] += 1


def test_oversized_messages_get_resource_exhausted(served: tuple[RoundCoordinator, grpc.Channel]) -> None:
    big = pb.UpdateMessage(chunk=pb.TensorChunk(tensor_index=0, offset=0, data=b"\0" * (17 << 20)))
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.CoordinatorStub(served[1]).SubmitUpdate(iter([big]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_after_the_fuzz_the_server_is_intact(served: tuple[RoundCoordinator, grpc.Channel]) -> None:
    coordinator, channel = served
    print(f"\nfuzz outcomes: {dict(SEEN)}")
    assert sum(SEEN.values()) >= 2500
    assert coordinator.received == SEEN["OK"]  # nothing counted that was not acknowledged
    assert weights_digest(coordinator.global_weights) == weights_digest(GLOBAL)
    valid = wire.update_stream(
        client_id=3, round_number=1, num_examples=10, metrics={"loss": 1.0}, specs=SPECS, arrays=GLOBAL
    )
    submit = channel.stream_unary(
        "/fedgrpc.v1.Coordinator/SubmitUpdate",
        request_serializer=wire.serialize,
        response_deserializer=pb.SubmitUpdateReply.FromString,
    )
    reply = submit(valid, timeout=10)
    assert reply.received == SEEN["OK"] + 1
