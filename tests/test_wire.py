"""The hand-written chunk framing against protobuf's own, and the parser that never raises."""

import numpy as np
import pytest
from fedgrpc.common import wire
from fedgrpc.common.config import EvaluationPlan, RunSpec, TaskRef
from fedgrpc.v1 import coordinator_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st


@given(
    index=st.integers(0, 2**32 - 1),
    offset=st.integers(0, 2**64 - 1),
    data=st.binary(min_size=0, max_size=300),
)
def test_encoded_chunks_are_byte_for_byte_what_protobuf_writes(index: int, offset: int, data: bytes) -> None:
    encoded = wire.encode_chunk(index, offset, memoryview(data))
    chunk = pb.TensorChunk(tensor_index=index, offset=offset, data=data)
    assert encoded == pb.UpdateMessage(chunk=chunk).SerializeToString()
    assert encoded == pb.WeightsMessage(chunk=chunk).SerializeToString()
    parsed = pb.UpdateMessage.FromString(encoded)
    assert (parsed.chunk.tensor_index, parsed.chunk.offset, parsed.chunk.data) == (index, offset, data)


def test_a_megabyte_chunk_round_trips() -> None:
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).data
    parsed = pb.WeightsMessage.FromString(wire.encode_chunk(3, 5 << 20, data))
    assert parsed.chunk.data == bytes(data) and parsed.chunk.offset == 5 << 20


def test_serialize_passes_encoded_bytes_through_and_serializes_messages() -> None:
    assert wire.serialize(b"\x12\x00") == b"\x12\x00"
    header = pb.UpdateMessage(header=pb.UpdateHeader(client_id=2))
    assert wire.serialize(header) == header.SerializeToString()


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x12\x05ab", b"\x0a\xff\xff\xff\xff\xff\xff"])
def test_the_update_parser_reports_garbage_instead_of_raising(garbage: bytes) -> None:
    parsed = wire.parse_update_message(garbage)
    assert isinstance(parsed, wire.Undecodable)
    assert parsed.size == len(garbage) and parsed.reason


def test_run_spec_round_trips_with_its_task_and_settings() -> None:
    run = RunSpec(
        rounds=4,
        num_clients=7,
        compression="int8",
        task=TaskRef("hospitals", "ab" * 32),
        task_params={"lr": 0.5, "layers": 3, "scaled": True, "name": "mlp", "big": 2**40},
        partition="dirichlet:0.3",
        evaluation=EvaluationPlan(every=2, fraction=0.5, personalize_epochs=1),
    )
    back = wire.run_from_pb(wire.run_to_pb(run))
    assert back == run
    assert {k: type(v) for k, v in back.task_params.items()} == {
        k: type(v) for k, v in run.task_params.items()
    }
